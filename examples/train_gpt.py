"""Train a small GPT on tripar's generated text corpus with automatic 3D parallelism.

Run it on N local CPU processes with torchrun:

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py

or in one process: ``python examples/train_gpt.py``. Every rank runs this same script;
``tripar.auto_parallel`` plans dp/pp, microbatches and schedule for the job it finds.
"""

from __future__ import annotations

import torch

import tripar.api as tripar
from tripar.data import CharTokenizer, TextBatches, corpus
from tripar.models import load_model

STEPS, BATCH, SEQ = 200, 16, 64


def main() -> None:
    text = corpus()
    tok = CharTokenizer.from_text(text)
    data = TextBatches(tok.encode(text), batch_size=BATCH, seq_len=SEQ, seed=0)
    loaded = load_model(f"gpt:layers=2,hidden=64,heads=4,vocab={tok.vocab_size},seq={SEQ}",
                        batch_size=BATCH)
    model = tripar.auto_parallel(
        loaded.model, example_inputs=data.batch(0), global_batch_size=BATCH,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3), max_grad_norm=1.0)
    rank = torch.distributed.get_rank()
    if rank == 0:
        print(model.plan.render().splitlines()[4])
    for step in range(STEPS):
        loss = model.train_step(data.batch(step))
        if rank == 0 and (step % 20 == 0 or step == STEPS - 1):
            print(f"step {step:4d}  loss {loss:.4f}")
    model.save("checkpoints/train_gpt")


if __name__ == "__main__":
    main()

"""README.md's "Train your own model on your own data" block, run as written.

The block is the fenced shell block after the marker comment. Its commands run in a
temporary directory, in this process to spare interpreter starts: ``python - <<'EOF'``
bodies are executed as ``__main__`` scripts, ``tripar ...`` lines (``\\`` continuations
joined) through ``tripar.cli.main`` with the same arguments. Any other line fails the
test, so the block cannot grow commands this test skips. The trained model then comes
out of the checkpoint three ways (transformers, torch, DCP), each with the logits of the
checkpoint's state dict in the model the README built.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/test_readme.py runs the next block -->"


def readme_block() -> str:
    """The shell block that follows the marker in README.md."""
    text = README.read_text(encoding="utf-8")
    assert MARKER in text, f"README.md lost the marker {MARKER}"
    match = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S)
    assert match, "no ```bash block after the README marker"
    return match.group(1)


def commands(block: str) -> list[tuple[str, str]]:
    """``("python", source)`` and ``("tripar", arguments)`` in order; comments and blank
    lines dropped."""
    out: list[tuple[str, str]] = []
    lines = iter(block.replace("\\\n", " ").splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.strip() == "python - <<'EOF'":
            body = []
            for inner in lines:
                if inner == "EOF":
                    break
                body.append(inner)
            out.append(("python", "\n".join(body) + "\n"))
        elif line.startswith("tripar "):
            out.append(("tripar", line[len("tripar "):]))
        else:
            raise AssertionError(f"README block: test_readme.py cannot run {line!r}; write "
                                 f"python - <<'EOF' ... EOF or tripar ... lines")
    return out


def test_the_block_parses_into_its_commands():
    kinds = [kind for kind, _ in commands(readme_block())]
    assert kinds == ["python", "tripar", "tripar", "python"]
    with pytest.raises(AssertionError, match="cannot run"):
        commands("ls -l\n")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory):
    """The block's commands run in a fresh directory; (directory, printed text)."""
    from tripar.cli import main

    where = tmp_path_factory.mktemp("readme")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(where)
        for kind, command in commands(readme_block()):
            if kind == "python":
                exec(compile(command, "README.md", "exec"), {"__name__": "__main__"})
            else:
                assert main(shlex.split(command)) == 0, command
    return where, printed.getvalue()


def test_the_readme_trains_saves_and_exports_to_transformers(ran):
    import transformers

    from tripar.models import load_model
    from tripar.runtime.checkpoint import read_manifest, read_state_dict
    from tripar.runtime.export import export_checkpoint

    where, printed = ran
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+) in 30 steps",
                                       printed).groups())
    assert last < first - 1.0, printed  # from about ln(vocabulary) = 5.8
    assert "the" in printed.split("wrote tiny-llama-trained (hf)\n")[1], printed  # generated
    manifest = read_manifest(where / "ckpt")
    assert manifest["parallel"]["pp"] == 2 and manifest["steps"] == 30
    assert manifest["model"]["spec"] == "hf:tiny-llama"

    # the checkpoint's state dict in the model the README built: the reference
    reference = load_model(f"hf:{where / 'tiny-llama'}", batch_size=2, seq_len=16).model.model
    state = {k.removeprefix("model."): v for k, v in read_state_dict(where / "ckpt").items()}
    reference.load_state_dict(state)
    ids = torch.randint(0, reference.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    want = logits(reference)
    exported = transformers.AutoModelForCausalLM.from_pretrained(where / "tiny-llama-trained")
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(exported), want)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, state[name]), name

    export_checkpoint(where / "ckpt", "hf", where / "sharded", max_shard_size="40KB")
    assert len(list((where / "sharded").glob("model-*.safetensors"))) > 1
    assert (where / "sharded" / "model.safetensors.index.json").is_file()
    sharded = transformers.AutoModelForCausalLM.from_pretrained(where / "sharded")
    assert torch.equal(logits(sharded), want)

    model = transformers.LlamaForCausalLM(reference.config)
    export_checkpoint(where / "ckpt", "torch", where / "model.pt")
    model.load_state_dict(torch.load(where / "model.pt", weights_only=True))
    assert torch.equal(logits(model), want)

    import torch.distributed.checkpoint as dcp

    export_checkpoint(where / "ckpt", "dcp", where / "dcp")
    model = transformers.LlamaForCausalLM(reference.config)
    loaded = model.state_dict()
    dcp.load(loaded, checkpoint_id=where / "dcp", no_dist=True)
    model.load_state_dict(loaded)
    assert torch.equal(logits(model), want)

"""batch_split and sequence_split: which nodes of a graph run on a slice of the microbatch."""

from __future__ import annotations

import torch
from torch import nn

from tripar.graph.batchwise import batch_split, microbatch_split, sequence_split
from tripar.graph.values import node_values


class _Normed(nn.Module):
    """A layer norm (per sample), then a batch norm (across the batch), then a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.bn, self.fc = nn.LayerNorm(6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.size()
        y = self.ln(x).reshape(b * s, h)
        return self.fc(self.bn(y) + torch.arange(h, dtype=x.dtype))


def _split(model: nn.Module, *inputs: torch.Tensor, batch: int, **kw):
    gm = torch.fx.symbolic_trace(model)
    return batch_split(gm, node_values(gm, list(inputs)), batch=batch, **kw)


def test_a_norm_across_the_batch_joins_and_sizes_follow_the_parts() -> None:
    split = _split(_Normed(), torch.randn(4, 5, 6), batch=4)
    assert split.inputs == {"x": 0}
    # per sample: the layer norm, the reshape to (b * s, h) (rows still grouped by sample)
    assert split.parts["ln"] == 0 and split.parts["reshape"] == 0
    assert "size" in split.parts  # (b, s, h) of a part: b changes
    assert {"getitem_1", "getitem_2"} <= split.uniform  # s and h: the same for every part
    assert "bn" in split.joins  # its statistics mix the samples
    # after the join the graph runs whole: nothing reads a part any more
    assert "fc" not in split.parts and "add" not in split.parts


def test_an_input_with_two_dims_of_the_batch_size_needs_its_dim_given() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    assert "several dims" in _split(model, torch.randn(4, 4, 4), batch=4).why_not
    split = _split(model, torch.randn(4, 4, 4), batch=4, known={"input_1": 0})
    assert split.inputs == {"input_1": 0} and split.parts == {"_0": 0}
    assert _split(model, torch.randn(1, 3, 4), batch=1).why_not.startswith(
        "a microbatch of one sample has no parts along the batch")


def test_attention_runs_per_sample_unless_the_batch_is_attended_over() -> None:
    def attend(q: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    gm = torch.fx.symbolic_trace(attend)
    values = node_values(gm, [torch.randn(3, 2, 5, 8)])
    assert "scaled_dot_product_attention" in batch_split(gm, values, batch=3).parts
    sideways = node_values(gm, [torch.randn(2, 5, 3, 8)])  # the batch as the sequence
    assert "scaled_dot_product_attention" in batch_split(gm, sideways, batch=3).joins


def test_after_a_join_the_parts_come_back() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    split = _split(model, torch.randn(4, 6), batch=4)
    assert split.parts["_0"] == 0 and "_1" in split.joins
    assert split.parts["_2"] == 0 and split.slices["_2"] == {"_1"}  # a slice of the join


class _Causal(nn.Module):
    """Positions, a projection, causal attention over the sequence, a projection, a mean."""

    def __init__(self) -> None:
        super().__init__()
        self.wpe, self.qkv, self.proj = nn.Embedding(16, 8), nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.wpe(torch.arange(x.size(1)))
        q, k, v = self.qkv(x).split(8, dim=2)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y).mean()


def test_one_sample_splits_its_sequence_around_the_attention() -> None:
    gm = torch.fx.symbolic_trace(_Causal())
    values = node_values(gm, [torch.randn(1, 6, 8)])
    split = sequence_split(gm, values, seq_len=6)
    assert (split.along, split.unit, split.inputs) == ("sequence", "tokens", {"x": 1})
    # positions built from a part's length would restart at 0: built whole, sliced
    assert "sizes alone" in split.joins["arange"]
    assert split.parts["wpe"] == 0 and split.slices["wpe"] == {"arange"}
    assert split.parts["qkv"] == 1
    # attention relates every token to the earlier ones: it runs whole ...
    assert "scaled_dot_product_attention" in split.joins
    # ... and the parts come back after it
    assert split.parts["proj"] == 1
    assert split.slices["proj"] == {"scaled_dot_product_attention"}
    assert "mean" in split.joins
    # micro-batch 1 splits the sequence; several samples split the batch
    assert microbatch_split(gm, values, micro_batch_size=1, seq_len=6) == split
    many = node_values(gm, [torch.randn(4, 6, 8)])
    by_batch = microbatch_split(gm, many, micro_batch_size=4, seq_len=6)
    assert by_batch.along == "batch" and by_batch.inputs == {"x": 0}
    assert "scaled_dot_product_attention" in by_batch.parts


def test_scores_relating_two_positions_are_a_join() -> None:
    def scores(q: torch.Tensor) -> torch.Tensor:
        return (q @ q.transpose(-2, -1)).softmax(-1) @ q

    gm = torch.fx.symbolic_trace(scores)
    split = sequence_split(gm, node_values(gm, [torch.randn(1, 6, 8)]), seq_len=6)
    assert "transpose" in split.parts and "matmul" in split.joins

"""Tensor-parallel layers (Megatron-style), each holding its rank's shard of the full layer.

- ``ColumnParallelLinear``: output features split across ranks; each rank computes its slice.
- ``MergedColumnParallelLinear``: several column-parallel layers in one matmul (gate + up).
- ``QKVParallelLinear``: q, k and v in one matmul, split by attention heads (``HeadLayout``).
- ``RowParallelLinear``: input features split; each rank computes a partial sum; all-reduce.
- ``VocabParallelEmbedding``: vocabulary rows split; ids outside a rank's rows give zeros; all-reduce.
- ``ParallelLMHead``: vocabulary rows split; each rank computes its logits; all-gather.

Every layer takes the *full* checkpoint tensor in ``weight_loader`` and keeps its shard, so the
model's loading code is the same at any TP degree. Sizes that do not divide by TP are padded with
zero rows / columns (zero output features, zero logits that are cut off, zero heads).

The linear layers are ``nn.Linear`` subclasses, so module swaps (quantization, the CPU transposed
layout) apply to them; ``collective`` — the all-reduce or all-gather that finishes the output, ``None``
at TP 1 — is carried over by the swap (``carry_collective``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from neuronserve.parallel.group import SINGLE, TPGroup
from neuronserve.parallel.heads import HeadLayout

Index = Sequence[int | None]  # source row/column of each local one; None: a zero (padding) one


def shard_range(total: int, rank: int, size: int) -> list[int | None]:
    """Rank ``rank``'s contiguous share of ``total`` rows, padded to ``ceil(total / size)``."""
    per = -(-total // size)
    return [i if i < total else None for i in range(rank * per, (rank + 1) * per)]


def head_rows(heads: Sequence[int | None], head_dim: int) -> list[int | None]:
    """The rows of each head in a ``[heads * head_dim, ...]`` weight, in order."""
    return [None if h is None else h * head_dim + d for h in heads for d in range(head_dim)]


def select(full: torch.Tensor, dim: int, index: Index) -> torch.Tensor:
    """``full``'s slices at ``index`` along ``dim``, zeros where the index is ``None``."""
    idx = torch.tensor([0 if i is None else i for i in index], dtype=torch.long)
    out = full.index_select(dim, idx)
    pad = [k for k, i in enumerate(index) if i is None]
    if pad:
        out.index_fill_(dim, torch.tensor(pad, dtype=torch.long), 0)
    return out


def _check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {tuple(expected)}")


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """A replicated parameter (norms): the whole tensor on every rank."""
    _check_shape(loaded, param.shape)
    param.data.copy_(loaded)


# ------------------------------------------------------------------ collectives
class AllReduce:
    def __init__(self, group: TPGroup) -> None:
        self.group = group

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(y)

    def __repr__(self) -> str:
        return f"AllReduce({self.group.size})"


class AllGatherColumns:
    """Concatenate every rank's output features and cut the padding off (``size`` real ones)."""

    def __init__(self, group: TPGroup, size: int) -> None:
        self.group, self.size = group, size

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather(y, dim=-1)[..., : self.size]

    def __repr__(self) -> str:
        return f"AllGatherColumns({self.group.size}, size={self.size})"


def finish(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Apply the module's collective, if it has one, to its local output."""
    collective = getattr(module, "collective", None)
    return y if collective is None else collective(y)


def carry_collective(old: nn.Module, new: nn.Module) -> nn.Module:
    """Give a swapped-in layer the collective of the layer it replaces."""
    new.collective = getattr(old, "collective", None)
    return new


# ------------------------------------------------------------------ linear layers
class ParallelLinear(nn.Linear):
    """An ``nn.Linear`` of this rank's shard. ``out_index`` / ``in_index``: the full layer's
    rows / columns this rank holds (``None`` entries are zero padding)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        out_index: Index,
        in_index: Index,
        bias: bool,
        group: TPGroup,
    ) -> None:
        super().__init__(len(in_index), len(out_index), bias=bias)
        self.input_size, self.output_size = input_size, output_size
        self.out_index, self.in_index = list(out_index), list(in_index)
        self.tp_rank, self.tp_size = group.rank, group.size
        self.collective = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return finish(self, F.linear(x, self.weight, self.bias))

    def _shard(self, loaded: torch.Tensor, is_bias: bool) -> torch.Tensor:
        expected = (self.output_size,) if is_bias else (self.output_size, self.input_size)
        _check_shape(loaded, expected)
        shard = select(loaded, 0, self.out_index)
        return shard if is_bias else select(shard, 1, self.in_index)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(self._shard(loaded, param is self.bias))

    def _load_part(
        self, param: torch.Tensor, loaded: torch.Tensor, size: int, offset: int, rows: Index
    ) -> None:
        """One part of a fused layer (``size`` output features in the checkpoint): its ``rows``
        go to local rows ``offset:offset + len(rows)``."""
        _check_shape(loaded, (size,) if param is self.bias else (size, self.input_size))
        param.data.narrow(0, offset, len(rows)).copy_(select(loaded, 0, rows))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tp={self.tp_rank}/{self.tp_size}, collective={self.collective}"


class ColumnParallelLinear(ParallelLinear):
    """Output features split across ranks; with ``gather_output`` every rank gets them all."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        group: TPGroup = SINGLE,
        gather_output: bool = False,
    ) -> None:
        out_index = shard_range(output_size, group.rank, group.size)
        super().__init__(input_size, output_size, out_index, range(input_size), bias, group)
        if gather_output and group.size > 1:
            self.collective = AllGatherColumns(group, output_size)


class MergedColumnParallelLinear(ParallelLinear):
    """Column-parallel layers of ``output_sizes`` fused into one matmul; each is split on its own,
    so the local output is ``[shard of part 0, shard of part 1, ...]``. ``shard_id``: the part."""

    def __init__(
        self, input_size: int, output_sizes: Sequence[int], bias: bool = False, group: TPGroup = SINGLE
    ) -> None:
        out_index, self.part_offsets = [], []
        for offset, size in zip(accumulate(output_sizes, initial=0), output_sizes):
            self.part_offsets.append(len(out_index))
            out_index += [
                None if i is None else offset + i for i in shard_range(size, group.rank, group.size)
            ]
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), out_index, range(input_size), bias, group)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        part = int(shard_id)
        rows = shard_range(self.output_sizes[part], self.tp_rank, self.tp_size)
        self._load_part(param, loaded, self.output_sizes[part], self.part_offsets[part], rows)


class QKVParallelLinear(ParallelLinear):
    """q, k and v projections in one matmul, split by heads as ``layout`` says (GQA replication
    and zero padding included). Local output: ``[q heads | k heads | v heads]`` of this rank.
    ``shard_id``: ``"q"``, ``"k"`` or ``"v"``."""

    def __init__(
        self, hidden_size: int, head_dim: int, layout: HeadLayout, bias: bool = False, group: TPGroup = SINGLE
    ) -> None:
        self.layout, self.head_dim = layout, head_dim
        q_rows = head_rows(layout.q_heads(group.rank), head_dim)
        kv_rows = head_rows(layout.kv_heads(group.rank), head_dim)
        self.part_rows = {"q": q_rows, "k": kv_rows, "v": kv_rows}
        self.part_sizes = {
            "q": layout.num_heads * head_dim,
            "k": layout.num_kv_heads * head_dim,
            "v": layout.num_kv_heads * head_dim,
        }
        self.part_offsets = {"q": 0, "k": len(q_rows), "v": len(q_rows) + len(kv_rows)}
        q_size, kv_size = self.part_sizes["q"], self.part_sizes["k"]
        out_index = q_rows + [None if r is None else q_size + r for r in kv_rows]
        out_index += [None if r is None else q_size + kv_size + r for r in kv_rows]
        super().__init__(hidden_size, q_size + 2 * kv_size, out_index, range(hidden_size), bias, group)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        size, offset, rows = self.part_sizes[shard_id], self.part_offsets[shard_id], self.part_rows[shard_id]
        self._load_part(param, loaded, size, offset, rows)


class RowParallelLinear(ParallelLinear):
    """Input features split across ranks (``in_index``: default a contiguous, padded share); the
    partial outputs are summed by an all-reduce. The bias is added on rank 0 only, so the sum
    holds it once."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        group: TPGroup = SINGLE,
        in_index: Index | None = None,
    ) -> None:
        if in_index is None:
            in_index = shard_range(input_size, group.rank, group.size)
        super().__init__(input_size, output_size, range(output_size), in_index, bias, group)
        if group.size > 1:
            self.collective = AllReduce(group)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        shard = self._shard(loaded, param is self.bias)
        if param is self.bias and self.tp_rank != 0:
            shard = torch.zeros_like(shard)
        param.data.copy_(shard)


class ParallelLMHead(ColumnParallelLinear):
    """The LM head split by vocabulary rows; logits are gathered so every rank has them all."""

    def __init__(self, hidden_size: int, vocab_size: int, group: TPGroup = SINGLE) -> None:
        super().__init__(hidden_size, vocab_size, bias=False, group=group, gather_output=True)


class VocabParallelEmbedding(nn.Embedding):
    """The embedding split by vocabulary rows (padded to a multiple of TP); a rank looks up only
    the ids it holds and the all-reduce assembles each row."""

    def __init__(self, vocab_size: int, hidden_size: int, group: TPGroup = SINGLE) -> None:
        self.row_index = shard_range(vocab_size, group.rank, group.size)
        super().__init__(len(self.row_index), hidden_size)
        self.vocab_size, self.group = vocab_size, group
        self.vocab_start = group.rank * len(self.row_index)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * mine[:, None]
        return self.group.all_reduce(out)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        _check_shape(loaded, (self.vocab_size, self.embedding_dim))
        param.data.copy_(select(loaded, 0, self.row_index))

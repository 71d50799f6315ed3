"""Flat, padded step tensors for the model's forward, built from the scheduler's decisions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neuronserve.core import PAD_BLOCK_ID, SchedulerOutput


@dataclass
class SeqChunk:
    """One sequence's share of a step: its new tokens, the position of the first, its blocks, and
    how many of its last tokens need logits (1; ``1 + drafts`` for a speculative decode)."""

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    num_logits: int = 1


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    slot_mapping: torch.Tensor  # (T,)
    block_tables: torch.Tensor  # (B, max_blocks)
    context_lens: torch.Tensor  # (B,)
    query_start_loc: torch.Tensor  # (B + 1,)
    logits_indices: torch.Tensor  # (L,): L = B, or more rows with speculative decoding
    num_tokens: int  # real tokens; the rest of T is padding
    num_seqs: int  # real sequences; the rest of B is padding
    num_logits: int = 0  # real logit rows; the rest of L is padding

    def as_args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.input_ids,
            self.positions,
            self.slot_mapping,
            self.block_tables,
            self.context_lens,
            self.query_start_loc,
            self.logits_indices,
        )


def chunks_from_output(out: SchedulerOutput) -> list[SeqChunk]:
    return [
        SeqChunk(out.token_ids(i), out.num_computed_tokens[i], r.block_ids, out.num_logits(i))
        for i, r in enumerate(out.requests)
    ]


def build_step_inputs(
    chunks: Sequence[SeqChunk],
    block_size: int,
    *,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    max_blocks: int | None = None,
    num_logits: int | None = None,
) -> StepInputs:
    """Flatten ``chunks`` and pad to ``num_tokens`` (T), ``num_seqs`` (B), ``max_blocks``
    (block-table width) and ``num_logits`` (L, logit rows); each defaults to the unpadded size
    (L: one row per padding sequence). Padding tokens write to the pad block and padding sequences
    are empty."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    context_lens: list[int] = []
    for c in chunks:
        n, table = len(c.token_ids), c.block_table
        input_ids.extend(c.token_ids)
        pos = range(c.start, c.start + n)
        positions.extend(pos)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        query_start_loc.append(query_start_loc[-1] + n)
        context_lens.append(c.start + n)
    real_tokens, real_seqs = len(input_ids), len(chunks)
    T = real_tokens if num_tokens is None else num_tokens
    B = real_seqs if num_seqs is None else num_seqs
    needed_blocks = max((-(-n // block_size) for n in context_lens), default=1)
    width = needed_blocks if max_blocks is None else max_blocks
    if real_tokens > T or real_seqs > B or width < needed_blocks:
        raise ValueError(
            f"step of {real_tokens} tokens, {real_seqs} sequences, {needed_blocks} blocks does not fit "
            f"the padded shape T={T}, B={B}, max_blocks={width}"
        )
    pad_tokens = T - real_tokens
    input_ids += [0] * pad_tokens
    positions += [0] * pad_tokens
    slots += [PAD_BLOCK_ID * block_size] * pad_tokens
    query_start_loc += [real_tokens] * (B - real_seqs)
    context_lens += [0] * (B - real_seqs)
    tables = [list(c.block_table[:width]) for c in chunks]
    tables = [t + [PAD_BLOCK_ID] * (width - len(t)) for t in tables]
    tables += [[PAD_BLOCK_ID] * width] * (B - real_seqs)
    rows = [max(0, q - j) for c, q in zip(chunks, query_start_loc[1:]) for j in range(c.num_logits, 0, -1)]
    L = len(rows) + B - real_seqs if num_logits is None else num_logits
    if len(rows) > L:
        raise ValueError(f"step of {len(rows)} logit rows does not fit the padded shape L={L}")
    logits_indices = rows + [0] * (L - len(rows))

    def tensor(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64)

    return StepInputs(
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        slot_mapping=tensor(slots),
        block_tables=tensor(tables).view(B, width),
        context_lens=tensor(context_lens),
        query_start_loc=tensor(query_start_loc),
        logits_indices=tensor(logits_indices),
        num_tokens=real_tokens,
        num_seqs=real_seqs,
        num_logits=len(rows),
    )


class DecodeInputs:
    """Step tensors of decode-only steps, kept from step to step.

    While the scheduler's decode batch keeps its rows and their offsets (the same
    ``SchedulerOutput.decode_offsets`` list: joins, leaves and accepted drafts replace it), a step
    moves every position by one and changes the block table only of the rows that enter a new
    block, so the tensors are updated in place instead of being rebuilt from Python lists. A step
    with prefill chunks or drafts returns ``None``; after it, or when rows join or leave or a step
    was skipped, the tensors are rebuilt.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._source: Sequence[int] | None = None  # the offsets list the tensors were built from
        self._clock = 0
        self._offsets = self._tables = self._arange = torch.empty(0, dtype=torch.int64)

    def build(self, out: SchedulerOutput) -> StepInputs | None:
        num_seqs = out.num_decodes
        if num_seqs == 0 or num_seqs != len(out.requests) or out.spec_token_ids:
            self._source = None
            return None
        bs, rows = self.block_size, out.requests
        fresh = out.decode_offsets is not self._source or out.clock != self._clock + 1
        if fresh:
            self._start(out)
        positions = self._offsets + out.clock
        if not fresh:
            entering = torch.nonzero(positions % bs == 0).flatten().tolist()
            if entering:
                needed = int(positions.max()) // bs + 1
                if needed > self._tables.shape[1]:  # a row outgrew the table's width
                    grown = self._tables.new_zeros(num_seqs, max(needed, 2 * self._tables.shape[1]))
                    grown[:, : self._tables.shape[1]] = self._tables
                    self._tables = grown
                for i in entering:
                    table = rows[i].block_ids
                    self._tables[i, len(table) - 1] = table[-1]
        self._clock = out.clock
        block_of = positions // bs
        input_ids = torch.tensor([r.output_token_ids[-1] for r in rows], dtype=torch.int64)
        width = int(block_of.max()) + 1
        tables = self._tables[:, :width].contiguous()
        slots = tables.gather(1, block_of[:, None]).squeeze(1) * bs + positions % bs
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slots,
            block_tables=tables,
            context_lens=positions + 1,
            query_start_loc=self._arange,
            logits_indices=self._arange[:num_seqs],
            num_tokens=num_seqs,
            num_seqs=num_seqs,
            num_logits=num_seqs,
        )

    def _start(self, out: SchedulerOutput) -> None:
        tables = [r.block_ids for r in out.requests]
        width = max(len(t) for t in tables) + 4
        self._tables = torch.tensor(
            [t + [PAD_BLOCK_ID] * (width - len(t)) for t in tables], dtype=torch.int64
        )
        self._offsets = torch.tensor(out.decode_offsets, dtype=torch.int64)
        self._source = out.decode_offsets
        self._arange = torch.arange(len(tables) + 1, dtype=torch.int64)


def check_token_ids(chunks: Sequence[SeqChunk], vocab_size: int) -> None:
    """Refuse ids the embedding table does not have, before they reach the model (or, with
    tensor parallelism, before any rank starts the step)."""
    top = max((max(c.token_ids) for c in chunks if c.token_ids), default=-1)
    if top >= vocab_size:
        raise ValueError(f"prompt_token_ids: token id {top} >= vocab_size {vocab_size}")


def eager_attention_plan(chunks: Sequence[SeqChunk], block_size: int):
    """The eager CPU split of a step's attention (see ``EagerAttentionPlan``): the leading run of
    one-token chunks takes the batched gather path; every later chunk attends as one segment."""
    from neuronserve.model.llama import EagerAttentionPlan

    num_decode = 0
    while num_decode < len(chunks) and len(chunks[num_decode].token_ids) == 1:
        num_decode += 1
    segments, start = [], num_decode
    for c in chunks[num_decode:]:
        end, context_len = start + len(c.token_ids), c.start + len(c.token_ids)
        blocks = torch.tensor(list(c.block_table[: -(-context_len // block_size)]), dtype=torch.int64)
        segments.append((start, end, context_len, blocks))
        start = end
    return EagerAttentionPlan(num_decode_tokens=num_decode, prefill_segments=segments)

"""Shape buckets of the static-graph backends: every step is padded to one of a fixed set of
shapes, and one graph is compiled per shape. Pure Python.

A bucket is ``(num_tokens T, num_seqs B, max_blocks)``: T from the scheduler's token buckets,
B = min(T, max_num_seqs) (a step never has more sequences than tokens), and the block-table width
from the context buckets (the longest context a step's sequences reach). With speculative decoding
(``num_speculative_tokens`` = k) a bucket also fixes its logit rows, ``min(T, B * (k + 1))``: k is
fixed per bucket, so speculation adds no graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuronserve.config import CacheConfig, CompileConfig, SchedulerConfig


@dataclass(frozen=True, order=True)
class Bucket:
    num_tokens: int
    num_seqs: int
    max_blocks: int
    num_logits: int = 0  # logit rows; 0: one per sequence (no speculative decoding)

    @property
    def logit_rows(self) -> int:
        return self.num_logits or self.num_seqs

    @property
    def name(self) -> str:
        spec = f"-l{self.num_logits}" if self.num_logits else ""
        return f"t{self.num_tokens}-b{self.num_seqs}-k{self.max_blocks}{spec}"


def make_buckets(
    scheduler_config: SchedulerConfig, cache_config: CacheConfig, compile_config: CompileConfig
) -> list[Bucket]:
    """Every (token bucket x context bucket) shape, sorted from smallest."""
    block_size, max_len = cache_config.block_size, scheduler_config.max_model_len
    contexts = sorted({min(c, max_len) for c in compile_config.context_buckets} | {max_len})
    widths = sorted({-(-c // block_size) for c in contexts})
    k = scheduler_config.num_speculative_tokens
    seqs = {t: min(t, scheduler_config.max_num_seqs) for t in scheduler_config.token_buckets}
    return sorted(
        Bucket(t, seqs[t], w, min(t, seqs[t] * (k + 1)) if k else 0)
        for t in scheduler_config.token_buckets
        for w in widths
    )


def pick_bucket(
    buckets: list[Bucket], num_tokens: int, num_seqs: int, num_blocks: int, num_logits: int = 0
) -> Bucket:
    """The cheapest bucket (fewest tokens x blocks) that holds a step; ``ValueError`` if none does."""
    fitting = [
        b
        for b in buckets
        if b.num_tokens >= num_tokens
        and b.num_seqs >= num_seqs
        and b.max_blocks >= num_blocks
        and b.logit_rows >= num_logits
    ]
    if not fitting:
        raise ValueError(
            f"step of {num_tokens} tokens, {num_seqs} sequences and {num_blocks} context blocks fits no "
            f"bucket (largest: {max(buckets)})"
        )
    return min(fitting, key=lambda b: (b.num_tokens * b.max_blocks, b))

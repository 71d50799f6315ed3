"""Configuration dataclasses shared by every layer.

Only the standard library is imported here, so the scheduler library (`neuronserve.core`) stays
importable without torch. Each dataclass validates itself in ``__post_init__`` and raises
``ValueError`` naming the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TOKEN_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512)


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{field_name}: {message}")


@dataclass
class SchedulerConfig:
    """Limits of one scheduling step and of the waiting queue.

    Attributes:
        max_num_seqs: most sequences in one step (the batch size ``B``).
        max_num_batched_tokens: token budget of one step (``T``); never above the largest bucket.
        max_model_len: most tokens (prompt + output) one sequence may hold.
        token_buckets: the static ``T`` sizes graphs are compiled for; each step is padded up to the
            smallest bucket that holds its tokens.
        max_waiting: most requests waiting for admission; beyond it ``add_request`` raises
            ``QueueFullError`` (``None``: unbounded).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    token_buckets: tuple[int, ...] = DEFAULT_TOKEN_BUCKETS
    max_waiting: int | None = 256

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _require(self.max_model_len >= 1, "max_model_len", f"must be >= 1, got {self.max_model_len}")
        buckets = tuple(sorted(set(self.token_buckets)))
        _require(len(buckets) > 0, "token_buckets", "must list at least one size")
        _require(buckets[0] >= 1, "token_buckets", f"sizes must be >= 1, got {buckets}")
        self.token_buckets = buckets
        _require(
            1 <= self.max_num_batched_tokens <= buckets[-1],
            "max_num_batched_tokens",
            f"must be in [1, largest token bucket {buckets[-1]}], got {self.max_num_batched_tokens}",
        )
        _require(
            self.max_num_seqs <= self.max_num_batched_tokens,
            "max_num_seqs",
            f"{self.max_num_seqs} sequences cannot each decode one token within "
            f"max_num_batched_tokens={self.max_num_batched_tokens}",
        )
        _require(
            self.max_waiting is None or self.max_waiting >= 1,
            "max_waiting",
            f"must be >= 1 or None, got {self.max_waiting}",
        )


@dataclass
class CacheConfig:
    """The paged KV cache.

    Attributes:
        block_size: tokens per KV block.
        num_blocks: blocks in the pool, including block 0, which is reserved as the pad block that
            padding tokens write to and block tables are padded with.
        enable_prefix_caching: reuse KV blocks of identical prompt prefixes across requests.
    """

    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}")
        _require(
            self.num_blocks >= 2,
            "num_blocks",
            f"must be >= 2 (block 0 is the reserved pad block), got {self.num_blocks}",
        )

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

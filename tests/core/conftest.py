import pytest

from neuronserve.core import CacheConfig, Request, Scheduler, SchedulerConfig


def make_scheduler(
    *,
    block_size: int = 4,
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    max_model_len: int = 64,
    token_buckets: tuple[int, ...] = (8, 16, 32),
    max_waiting: int | None = 16,
    enable_prefix_caching: bool = True,
    num_speculative_tokens: int = 0,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            token_buckets=token_buckets,
            max_waiting=max_waiting,
            num_speculative_tokens=num_speculative_tokens,
        ),
        CacheConfig(
            block_size=block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=enable_prefix_caching,
        ),
    )


def req(rid: str, n_prompt: int = 5, max_tokens: int = 4, start: int = 1, **kw) -> Request:
    return Request(rid, list(range(start, start + n_prompt)), max_tokens=max_tokens, **kw)


@pytest.fixture
def scheduler() -> Scheduler:
    return make_scheduler()

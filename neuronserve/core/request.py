"""A request as the scheduler sees it: token ids, progress and status. No tensors."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again; its KV was freed and will be recomputed
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens or max_model_len reached
    STOP = "stop"  # eos, a stop token id, or (decided by the engine) a stop string
    ABORT = "abort"


class _Clock(Protocol):
    clock: int


class Request:
    """One generation request.

    ``num_computed_tokens`` (tokens whose KV is in the cache) catches up with ``num_tokens``
    (prompt + output so far): that one rule covers prefill, chunked prefill, decode and recompute
    after preemption.

    ``priority``: smaller values are served first (vLLM's convention); ties go by arrival.
    ``cache_salt``: mixed into the prefix-cache hash so tenants never share KV blocks.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "max_tokens",
        "priority",
        "eos_token_id",
        "stop_token_ids",
        "ignore_eos",
        "cache_salt",
        "output_token_ids",
        "max_num_tokens",
        "stop_set",
        "_computed",
        "_batch",
        "num_cached_tokens",
        "status",
        "finish_reason",
        "arrival_seq",
        "block_ids",
        "block_hashes",
        "num_preemptions",
        "spec_token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int = 16,
        priority: int = 0,
        eos_token_id: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.max_tokens = max_tokens
        self.priority = priority
        self.eos_token_id = eos_token_id
        self.stop_token_ids = frozenset(stop_token_ids)
        self.ignore_eos = ignore_eos
        self.cache_salt = cache_salt
        self.output_token_ids: list[int] = []
        self.max_num_tokens = 0  # prompt + max_tokens, set once the scheduler validated them
        # Sampling any of these ends the request with reason STOP.
        self.stop_set = self.stop_token_ids | (
            {eos_token_id} if eos_token_id is not None and not ignore_eos else set()
        )
        # While the request is a row of the scheduler's decode batch (``_batch``), ``_computed`` is
        # an offset from the batch's clock, so one clock tick advances every decoding row at once.
        self._batch: _Clock | None = None
        self._computed = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at last admission
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_seq = -1  # set by the scheduler; orders ties between equal priorities
        self.block_ids: list[int] = []  # the block table, owned by the BlockManager
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks known so far
        self.num_preemptions = 0
        # Draft tokens proposed to follow the last token (set by the engine's proposer between
        # steps). Unverified: never part of the token lists, the prefix-cache hashes or num_tokens.
        self.spec_token_ids: list[int] = []

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose KV is in the cache."""
        batch = self._batch
        return self._computed if batch is None else self._computed + batch.clock

    @num_computed_tokens.setter
    def num_computed_tokens(self, value: int) -> None:
        batch = self._batch
        self._computed = value if batch is None else value - batch.clock

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        """Token ids ``[start, stop)`` across prompt and output, without building the whole list."""
        n_prompt = len(self.prompt_token_ids)
        if stop <= n_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : stop - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - n_prompt]

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"output={len(self.output_token_ids)}, computed={self.num_computed_tokens})"
        )

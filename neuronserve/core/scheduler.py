"""Continuous batching over the paged KV cache.

Each step spends a token budget: running decodes first (one token each), then prefill chunks of
running and waiting requests fill what is left, so prefill and decode share one step. When blocks
run out, the lowest-priority, latest-arrived running request is preempted by recompute: its blocks
are freed and it waits again, ahead of everything that arrived after it.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.core.block_manager import BlockManager
from neuronserve.core.request import FinishReason, Request, RequestStatus


class QueueFullError(RuntimeError):
    """Raised by ``add_request`` when ``max_waiting`` requests already wait (admission control)."""


def _queue_key(request: Request) -> tuple[int, int]:
    # Waiting order, and (reversed) preemption order: priority first, then arrival.
    return (request.priority, request.arrival_seq)


@dataclass
class SchedulerOutput:
    """One step's decisions, in batch order. ``num_computed_tokens[i]`` is the position of request
    ``i``'s first new token; its block table is ``requests[i].block_ids`` until ``update``.

    ``spec_token_ids``: the draft tokens scheduled after a decode's next token, by request id; such a
    request's chunk is its next token + the drafts, and the runner returns the logits of all of them
    (``num_logits``). ``update`` learns which were accepted and rolls the rest back."""

    requests: list[Request]
    num_new_tokens: list[int]
    num_computed_tokens: list[int]
    bucket: int  # padded T: the smallest token bucket >= num_scheduled_tokens (0 for an empty step)
    block_size: int
    preempted_ids: list[str] = field(default_factory=list)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def request_ids(self) -> list[str]:
        return [r.request_id for r in self.requests]

    @property
    def block_tables(self) -> list[list[int]]:
        return [r.block_ids for r in self.requests]

    def __len__(self) -> int:
        return len(self.requests)

    def token_ids(self, i: int) -> list[int]:
        """The ids of request ``i``'s new tokens this step."""
        start, request = self.num_computed_tokens[i], self.requests[i]
        drafts = self.spec_token_ids.get(request.request_id, [])
        return request.token_ids_slice(start, start + self.num_new_tokens[i] - len(drafts)) + drafts

    def slot_mapping(self, i: int) -> list[int]:
        """The KV-cache slot (``block_id * block_size + offset``) of each of request ``i``'s new tokens."""
        bs, table, start = self.block_size, self.requests[i].block_ids, self.num_computed_tokens[i]
        return [table[p // bs] * bs + p % bs for p in range(start, start + self.num_new_tokens[i])]

    def samples(self, i: int) -> bool:
        """Whether request ``i`` reaches its last token this step, so a token is sampled for it."""
        return self.num_computed_tokens[i] + self.num_new_tokens[i] >= self.requests[i].num_tokens

    def num_logits(self, i: int) -> int:
        """Logit rows the runner returns for request ``i``: its last new token's, or with drafts
        the next token's and each draft's."""
        return 1 + len(self.spec_token_ids.get(self.requests[i].request_id, ()))


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    kv_cache_usage: float  # fraction of usable blocks owned by requests
    prefix_cache_queries: int  # tokens looked up at admission
    prefix_cache_hits: int  # tokens found cached
    num_preemptions: int
    num_steps: int


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        usable_tokens = cache_config.num_usable_blocks * cache_config.block_size
        if usable_tokens < scheduler_config.max_model_len:
            raise ValueError(
                f"num_blocks: {cache_config.num_usable_blocks} usable blocks of "
                f"{cache_config.block_size} tokens hold {usable_tokens} tokens, fewer than "
                f"max_model_len={scheduler_config.max_model_len}; one long request could never run"
            )
        self.config = scheduler_config
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        self.block_manager = BlockManager(
            cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.token_budget = scheduler_config.max_num_batched_tokens
        self.waiting: list[Request] = []  # sorted by (priority, arrival)
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self._next_arrival = 0
        self.num_preemptions = 0
        self.num_steps = 0

    # ---------------------------------------------------------------- requests in and out
    def add_request(self, request: Request) -> None:
        """Queue a request. Raises ``ValueError`` naming the bad field, or ``QueueFullError``;
        either way the scheduler is left unchanged."""
        self._validate(request)
        max_waiting = self.config.max_waiting
        if max_waiting is not None and len(self.waiting) >= max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests already wait (max_waiting={max_waiting})")
        request.max_num_tokens = request.num_tokens + request.max_tokens
        request.arrival_seq = self._next_arrival
        self._next_arrival += 1
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=_queue_key)
        self.requests[request.request_id] = request

    def _validate(self, request: Request) -> None:
        n_prompt, max_len = len(request.prompt_token_ids), self.config.max_model_len
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        if n_prompt == 0:
            raise ValueError("prompt_token_ids: the prompt is empty")
        if min(request.prompt_token_ids) < 0:
            raise ValueError("prompt_token_ids: token ids must be >= 0")
        if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {request.max_tokens!r}")
        if n_prompt + request.max_tokens > max_len:
            raise ValueError(
                f"max_tokens: the prompt's {n_prompt} tokens + max_tokens={request.max_tokens} "
                f"exceed max_model_len={max_len}"
            )

    def abort(self, request_id: str) -> Request | None:
        """Abort a request and free its blocks; an unknown or finished id is a no-op."""
        return self.finish_request(request_id, FinishReason.ABORT)

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish a request from outside (abort, or a stop string the engine detected)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, reason)
        return request

    def _finish(self, request: Request, reason: FinishReason) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget
        bs, bm, running_status = self.block_size, self.block_manager, RequestStatus.RUNNING
        requests: list[Request] = []  # batch order
        num_new_tokens: list[int] = []
        preempted: list[Request] = []
        prefilling: list[Request] = []

        # 1. Running decodes, one token each. max_num_seqs <= budget, so they always fit.
        for request in list(self.running):
            if preempted and request.status is not running_status:
                continue  # preempted earlier in this loop
            computed = request.num_computed_tokens
            if request.num_tokens - computed != 1:
                prefilling.append(request)
            elif computed < len(request.block_ids) * bs or self._reserve(request, 1, preempted):
                requests.append(request)
        num_new_tokens = [1] * len(requests)

        # 2. Prefill chunks of running requests, then of waiting ones, while budget lasts.
        for request in prefilling:
            budget = self.token_budget - sum(num_new_tokens)  # victims unscheduled below still count
            if budget == 0:
                break
            if request.status is running_status:
                n = min(request.num_tokens - request.num_computed_tokens, budget)
                if self._reserve(request, n, preempted):
                    requests.append(request)
                    num_new_tokens.append(n)
        if preempted:  # a victim scheduled earlier in this step leaves the batch
            kept = [i for i, r in enumerate(requests) if r.status is running_status]
            requests = [requests[i] for i in kept]
            num_new_tokens = [num_new_tokens[i] for i in kept]
        budget = self.token_budget - sum(num_new_tokens)
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            hits = bm.find_cached_prefix(request)
            num_hit_tokens = len(hits) * bs
            n = min(request.num_tokens - num_hit_tokens, budget)
            if not bm.allocate(request, n, hits):
                break  # head-of-line waits; admitting a later one could starve it
            bm.prefix_queries += request.num_tokens
            bm.prefix_hits += num_hit_tokens
            self.waiting.pop(0)
            request.num_computed_tokens = request.num_cached_tokens = num_hit_tokens
            request.status = running_status
            self.running.append(request)
            requests.append(request)
            num_new_tokens.append(n)
            budget -= n

        spec_token_ids = self._schedule_drafts(requests, num_new_tokens, budget) if not preempted else {}
        budget -= sum(len(d) for d in spec_token_ids.values())
        self.num_steps += 1
        num_tokens = self.token_budget - budget
        buckets = self.config.token_buckets
        return SchedulerOutput(
            requests=requests,
            num_new_tokens=num_new_tokens,
            num_computed_tokens=[r.num_computed_tokens for r in requests],
            bucket=buckets[bisect.bisect_left(buckets, num_tokens)] if num_tokens else 0,
            block_size=bs,
            preempted_ids=[r.request_id for r in preempted],
            spec_token_ids=spec_token_ids,
        )

    def _schedule_drafts(
        self, requests: list[Request], num_new_tokens: list[int], budget: int
    ) -> dict[str, list[int]]:
        """Append each scheduled decode's proposed drafts (``request.spec_token_ids``) to its chunk,
        while budget, free blocks, ``num_speculative_tokens`` and the request's ``max_tokens`` allow.
        Drafts never preempt anything: without blocks for them a request just decodes."""
        drafts: dict[str, list[int]] = {}
        k = self.config.num_speculative_tokens
        for i, request in enumerate(requests):
            proposal = request.spec_token_ids
            if not proposal or budget <= 0 or num_new_tokens[i] != 1:
                continue
            if request.num_tokens - request.num_computed_tokens != 1:
                continue  # the last token of a prefill chunk: nothing was proposed after it
            # Accepting every draft yields n + 1 tokens; the request may still get max - num_tokens.
            n = min(len(proposal), k, budget, request.max_num_tokens - request.num_tokens - 1)
            if n > 0 and self.block_manager.allocate(request, 1 + n):
                drafts[request.request_id] = proposal[:n]
                num_new_tokens[i] += n
                budget -= n
        return drafts

    def _reserve(self, request: Request, num_new_tokens: int, preempted: list[Request]) -> bool:
        """Allocate blocks for ``request``, preempting victims until they fit; ``False`` when the
        request itself had to be preempted."""
        while not self.block_manager.allocate(request, num_new_tokens):
            victim = max(self.running, key=_queue_key)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=_queue_key)

    def update(
        self, output: SchedulerOutput, sampled_token_ids: Mapping[str, int] | Sequence[int]
    ) -> list[Request]:
        """Advance the step's requests and return those that finished.

        ``sampled_token_ids`` holds a token for each request that reached its last token
        (``output.samples(i)``): a mapping by request id, or a sequence in batch order with one
        entry per scheduled request (entries of requests still mid-prefill are ignored). A request
        that verified drafts (``output.spec_token_ids``) gets the list of tokens it emitted: its
        accepted drafts, then the model's own token.
        """
        requests = output.requests
        if isinstance(sampled_token_ids, Mapping):
            sampled_token_ids = [sampled_token_ids.get(r.request_id) for r in requests]
        elif len(sampled_token_ids) != len(requests):
            raise ValueError(
                f"sampled_token_ids: {len(sampled_token_ids)} tokens for {len(requests)} requests"
            )
        num_new_tokens = output.num_new_tokens
        if output.spec_token_ids:  # accepted drafts join the output; rejected ones are rolled back
            num_new_tokens, sampled_token_ids = self._accept_drafts(output, sampled_token_ids)
        finished: list[Request] = []
        bs, bm, running_status = self.block_size, self.block_manager, RequestStatus.RUNNING
        caching = bm.enable_prefix_caching
        for request, n, token in zip(requests, num_new_tokens, sampled_token_ids):
            if request.status is not running_status:
                continue  # aborted or finished since schedule()
            computed = request.num_computed_tokens + n
            request.num_computed_tokens = computed
            if caching and computed % bs < n:  # a block boundary was crossed
                bm.cache_full_blocks(request)
            if computed < request.num_tokens:
                continue  # a prefill chunk; nothing sampled yet
            if token is None:
                raise ValueError(f"sampled_token_ids: no token for request {request.request_id!r}")
            request.output_token_ids.append(token)
            request.num_tokens = computed + 1
            if token in request.stop_set:
                self._finish(request, FinishReason.STOP)
            elif computed + 1 >= request.max_num_tokens:
                self._finish(request, FinishReason.LENGTH)
            else:
                continue
            finished.append(request)
        if finished:
            self.running = [r for r in self.running if r.status is running_status]
        return finished

    def _accept_drafts(self, output: SchedulerOutput, sampled: Sequence) -> tuple[list[int], list]:
        """For each request that verified drafts, ``sampled`` holds the tokens it emitted: the
        accepted drafts, then one token the model chose. Append the accepted drafts (up to a stop
        token or ``max_tokens``) to its output, count only verified tokens as computed, and free the
        blocks that hold nothing but rejected drafts; their slots are overwritten by later tokens.
        Returns, in batch order, the tokens each request computed and the one token left to append."""
        num_new_tokens, last_tokens = list(output.num_new_tokens), list(sampled)
        for i, request in enumerate(output.requests):
            drafts = output.spec_token_ids.get(request.request_id)
            if drafts is None or request.status is not RequestStatus.RUNNING:
                continue
            emitted = [sampled[i]] if isinstance(sampled[i], int) else list(sampled[i])
            if not 1 <= len(emitted) <= len(drafts) + 1 or emitted[:-1] != drafts[: len(emitted) - 1]:
                raise ValueError(f"sampled_token_ids: {emitted} do not verify drafts {drafts}")
            emitted = emitted[: request.max_num_tokens - request.num_tokens]
            stop = next((j for j, t in enumerate(emitted) if t in request.stop_set), None)
            *accepted, last_tokens[i] = emitted if stop is None else emitted[: stop + 1]
            request.output_token_ids.extend(accepted)
            request.num_tokens += len(accepted)
            num_new_tokens[i] = 1 + len(accepted)
            self.block_manager.trim(request, request.num_computed_tokens + num_new_tokens[i])
        return num_new_tokens, last_tokens

    # ---------------------------------------------------------------- observability
    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.usage,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
        )

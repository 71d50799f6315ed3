"""Continuous batching over the paged KV cache.

Each step spends a token budget: running decodes first (one token each), then prefill chunks of
running and waiting requests fill what is left, so prefill and decode share one step. When blocks
run out, the lowest-priority, latest-arrived running request is preempted by recompute: its blocks
are freed and it waits again, ahead of everything that arrived after it.

Decoding requests are rows of a persistent ``DecodeBatch``: each step every row advances by one
token, so a step without arrivals, prefills or finishes only touches the rows that enter a new
KV block; the rest of its cost is a few list operations done in C.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

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
    """One step's decisions, in batch order: first the decode batch's rows (``num_decodes``, one
    token each, plus any drafts), then prefill chunks. ``num_computed_tokens[i]`` is the position of
    request ``i``'s first new token; its block table is ``requests[i].block_ids`` until ``update``.
    The lists are shared with the scheduler's persistent batch: read them, never change them.

    ``spec_token_ids``: the draft tokens scheduled after a decode's next token, by request id; such a
    request's chunk is its next token + the drafts, and the runner returns the logits of all of them
    (``num_logits``). ``update`` learns which were accepted and rolls the rest back."""

    requests: list[Request]
    num_new_tokens: list[int]
    bucket: int  # padded T: the smallest token bucket >= num_scheduled_tokens (0 for an empty step)
    block_size: int
    preempted_ids: list[str] = field(default_factory=list)
    num_decodes: int = 0
    decode_offsets: Sequence[int] = ()  # the decode rows' positions minus ``clock``
    clock: int = 0  # the decode batch's clock when this step was scheduled
    prefill_computed: list[int] = field(default_factory=list)  # positions of the prefill chunks
    batch_version: int = 0  # the decode batch's membership version when this step was scheduled
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @cached_property
    def num_computed_tokens(self) -> list[int]:
        clock = self.clock
        return [o + clock for o in self.decode_offsets] + self.prefill_computed

    @cached_property
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


class DecodeBatch:
    """The running requests that are decoding, as rows that persist from step to step.

    Every row computes one token a step, so a row's position is a fixed offset plus the batch's
    ``clock``, which ``Scheduler.update`` ticks once a step. Rows are grouped by their offset modulo
    the block size (the rows entering a new block at a given clock are one group) and by the clock
    at which they reach ``max_num_tokens``. The row lists are replaced, never changed in place, when
    rows join or leave, so an earlier ``SchedulerOutput`` keeps seeing its own step's rows.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.clock = 0
        self._due_clock = -1  # the clock whose due rows got their blocks
        self.version = 0  # bumped whenever rows join or leave
        self.rows: list[Request] = []
        self.outputs: list[list[int]] = []  # the rows' output_token_ids lists, in row order
        self.offsets: list[int] = []  # the rows' positions minus the clock
        self.by_phase: list[dict[Request, None]] = [{} for _ in range(block_size)]
        self.finish_at: dict[int, list[Request]] = {}  # clock -> rows reaching max_num_tokens then
        # stop token id -> rows that stop on it, and the ids as a frozenset (rebuilt only when an
        # id appears or goes). None is always in it, so a missing token takes the same slow path
        # as a stop token: one set lookup a row finds both.
        self.stop_counts: dict[int | None, int] = {None: 1}
        self.stop_ids: frozenset[int | None] = frozenset((None,))

    def __len__(self) -> int:
        return len(self.rows)

    def due(self) -> list[Request]:
        """The rows whose next token starts a new block (position a multiple of the block size),
        once per clock: a second ``schedule()`` before ``update()`` must not give them another."""
        if self._due_clock == self.clock:
            return []
        self._due_clock = self.clock
        return list(self.by_phase[-self.clock % self.block_size])

    def join(self, requests: Sequence[Request]) -> None:
        """Add requests whose prompt is computed and whose next step decodes one token."""
        clock, bs = self.clock, self.block_size
        offsets = []
        for request in requests:
            offset = request._computed - clock  # the request is not a row yet: _computed is absolute
            request._batch, request._computed = self, offset
            offsets.append(offset)
            self.by_phase[offset % bs][request] = None
            self.finish_at.setdefault(request.max_num_tokens - 1 - offset, []).append(request)
            for token in request.stop_set:
                self.stop_counts[token] = self.stop_counts.get(token, 0) + 1
        if len(self.stop_counts) != len(self.stop_ids):
            self.stop_ids = frozenset(self.stop_counts)
        self.rows = self.rows + list(requests)
        self.outputs = self.outputs + [r.output_token_ids for r in requests]
        self.offsets = self.offsets + offsets
        self.version += 1

    def shift(self, moves: Sequence[tuple[Request, int]]) -> None:
        """Move rows on by extra tokens (accepted drafts) on top of the clock's one."""
        if not moves:
            return
        bs, offsets, index = self.block_size, list(self.offsets), {id(r): i for i, r in enumerate(self.rows)}
        for request, n in moves:
            offset = request._computed
            del self.by_phase[offset % bs][request]
            offset += n
            request._computed = offsets[index[id(request)]] = offset
            self.by_phase[offset % bs][request] = None
            self.finish_at.setdefault(request.max_num_tokens - 1 - offset, []).append(request)
        self.offsets = offsets  # a new list: earlier outputs keep theirs

    def leave(self, requests: Iterable[Request]) -> None:
        """Remove rows (finished, aborted or preempted); their positions become absolute again."""
        clock, bs, stops = self.clock, self.block_size, self.stop_counts
        for request in requests:
            if request._batch is not self:
                continue
            offset = request._computed
            del self.by_phase[offset % bs][request]
            request._batch, request._computed = None, offset + clock
            for token in request.stop_set:
                if stops[token] == 1:
                    del stops[token]
                else:
                    stops[token] -= 1
        if len(stops) != len(self.stop_ids):
            self.stop_ids = frozenset(stops)
        # finish_at keeps stale entries; update() checks each entry before it finishes a request.
        keep = [i for i, r in enumerate(self.rows) if r._batch is self]
        self.rows = [self.rows[i] for i in keep]
        self.outputs = [self.outputs[i] for i in keep]
        self.offsets = [self.offsets[i] for i in keep]
        self.version += 1


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
        self.batch = DecodeBatch(cache_config.block_size)  # the running requests that decode
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
            self.batch.leave((request,))
        else:
            self.waiting.remove(request)
        self._finish(request, reason)
        return request

    def _finish(self, request: Request, reason: FinishReason) -> None:
        """Free a request that has left the running list and the decode batch."""
        self._release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- one step
    def schedule(self) -> SchedulerOutput:
        bs, bm, batch, running_status = self.block_size, self.block_manager, self.batch, RequestStatus.RUNNING
        preempted: list[Request] = []

        # 1. The decode batch: one token for every row; only rows entering a new block need work,
        # and only when the pool runs dry does a row have to wait for victims to be preempted.
        for request in bm.append_blocks(batch.due()):
            if request._batch is batch:  # not preempted earlier in this loop
                self._reserve(request, 1, preempted)
        budget = self.token_budget - len(batch)  # max_num_seqs <= budget, so decodes always fit

        # 2. Prefill chunks of running requests, then of waiting ones, while budget lasts.
        prefills: list[Request] = []
        chunks: list[int] = []
        if len(self.running) > len(batch):
            for request in [r for r in self.running if r._batch is None]:
                if budget <= 0:
                    break
                if request.status is running_status:  # not preempted by an earlier one
                    n = min(request.num_tokens - request.num_computed_tokens, budget)
                    if self._reserve(request, n, preempted):
                        prefills.append(request)
                        chunks.append(n)
                        budget -= n
            if preempted:  # a victim scheduled earlier in this step leaves the batch
                kept = [i for i, r in enumerate(prefills) if r.status is running_status]
                prefills = [prefills[i] for i in kept]
                chunks = [chunks[i] for i in kept]
                budget = self.token_budget - len(batch) - sum(chunks)
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
            prefills.append(request)
            chunks.append(n)
            budget -= n

        self.num_steps += 1
        num_decodes = len(batch)
        requests = batch.rows + prefills if prefills else batch.rows
        num_new_tokens = [1] * num_decodes + chunks
        spec_token_ids: dict[str, list[int]] = {}
        if self.config.num_speculative_tokens and not preempted:
            spec_token_ids = self._schedule_drafts(requests[:num_decodes], num_new_tokens, budget)
        num_tokens = self.token_budget - budget + sum(len(d) for d in spec_token_ids.values())
        buckets = self.config.token_buckets
        return SchedulerOutput(
            requests=requests,
            num_new_tokens=num_new_tokens,
            bucket=buckets[bisect.bisect_left(buckets, num_tokens)] if num_tokens else 0,
            block_size=bs,
            preempted_ids=[r.request_id for r in preempted],
            num_decodes=num_decodes,
            decode_offsets=batch.offsets,
            clock=batch.clock,
            prefill_computed=[r.num_computed_tokens for r in prefills],
            batch_version=batch.version,
            spec_token_ids=spec_token_ids,
        )

    def _schedule_drafts(
        self, requests: list[Request], num_new_tokens: list[int], budget: int
    ) -> dict[str, list[int]]:
        """Append each decode row's proposed drafts (``request.spec_token_ids``) to its chunk,
        while budget, free blocks, ``num_speculative_tokens`` and the request's ``max_tokens`` allow.
        Drafts never preempt anything: without blocks for them a request just decodes."""
        drafts: dict[str, list[int]] = {}
        k = self.config.num_speculative_tokens
        for i, request in enumerate(requests):  # the decode rows
            proposal = request.spec_token_ids
            if not proposal or budget <= 0:
                continue
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
        self.batch.leave((request,))
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=_queue_key)

    def _release(self, request: Request) -> None:
        # Blocks filled while decoding are published to the prefix cache here, once, rather than
        # hashed on every step that fills one (a prefill's blocks are published as they fill).
        self.block_manager.cache_full_blocks(request)
        self.block_manager.free(request)

    def update(
        self, output: SchedulerOutput, sampled_token_ids: Mapping[str, int] | Sequence[int | None]
    ) -> list[Request]:
        """Advance the step's requests and return those that finished.

        ``sampled_token_ids`` holds a token for each request that reached its last token
        (``output.samples(i)``; every decode row does): a mapping by request id, or a sequence in
        batch order with one entry per scheduled request (entries of requests still mid-prefill
        are ignored). A request that verified drafts (``output.spec_token_ids``) gets the list of
        tokens it emitted: its accepted drafts, then the model's own token. ``output`` must be the
        latest ``schedule()``'s.
        """
        requests, batch = output.requests, self.batch
        if isinstance(sampled_token_ids, Mapping):
            sampled_token_ids = [sampled_token_ids.get(r.request_id) for r in requests]
        elif len(sampled_token_ids) != len(requests):
            raise ValueError(
                f"sampled_token_ids: {len(sampled_token_ids)} tokens for {len(requests)} requests"
            )
        if output.clock != batch.clock:
            raise ValueError("output: update() takes the output of the latest schedule(), once")
        if output.spec_token_ids:  # accepted drafts join the output; rejected ones are rolled back
            sampled_token_ids = self._accept_drafts(output, sampled_token_ids)
        n_dec = output.num_decodes
        tokens = sampled_token_ids[:n_dec] if len(sampled_token_ids) > n_dec else sampled_token_ids
        running_status = RequestStatus.RUNNING
        stopped: list[Request] = []
        lengths: list[Request] = []
        rows, hits = requests[:n_dec] if len(requests) > n_dec else requests, False
        if n_dec:
            hits = not batch.stop_ids.isdisjoint(tokens)
            if hits and None in tokens:  # checked before anything changes
                row = tokens.index(None)
                raise ValueError(f"sampled_token_ids: no token for request {requests[row].request_id!r}")
            if output.batch_version == batch.version:  # the usual case: append in C
                any(map(list.append, batch.outputs, tokens))  # append returns None: any() runs them all
            else:  # rows were aborted or finished since schedule()
                for request, token in zip(rows, tokens):
                    if request._batch is batch:
                        request.output_token_ids.append(token)
        batch.clock += 1  # every row computed its token (the clock moves on empty steps too)
        if hits:
            stopped = [r for r, t in zip(rows, tokens) if t in r.stop_set and r._batch is batch]
        for request in stopped:
            request.status = RequestStatus.FINISHED  # marked now, freed below
        # An entry may be stale (the row left and joined again) or repeated: check each.
        for request in batch.finish_at.pop(batch.clock, ()):
            alive = request._batch is batch and request.status is running_status
            if alive and request.num_tokens >= request.max_num_tokens:
                request.status = RequestStatus.FINISHED
                lengths.append(request)
        finished = [(r, FinishReason.STOP) for r in stopped] + [(r, FinishReason.LENGTH) for r in lengths]
        if finished:
            batch.leave(r for r, _ in finished)

        # Prefill chunks: advance, publish full blocks, and sample once the prompt is computed.
        joined: list[Request] = []
        bs, bm = self.block_size, self.block_manager
        caching = bm.enable_prefix_caching
        for request, n, token in zip(
            requests[n_dec:], output.num_new_tokens[n_dec:], sampled_token_ids[n_dec:]
        ):
            if request.status is not running_status or request._batch is not None:
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
            if token in request.stop_set:
                finished.append((request, FinishReason.STOP))
            elif computed + 1 >= request.max_num_tokens:
                finished.append((request, FinishReason.LENGTH))
            else:
                joined.append(request)
        if joined:
            batch.join(joined)
        if finished:
            for request, reason in finished:
                self._finish(request, reason)
            self.running = [r for r in self.running if r.status is running_status]
        return [r for r, _ in finished]

    def _accept_drafts(self, output: SchedulerOutput, sampled: Sequence) -> tuple[list[int], list]:
        """For each request that verified drafts, ``sampled`` holds the tokens it emitted: the
        accepted drafts, then one token the model chose. Append the accepted drafts (up to a stop
        token or ``max_tokens``) to its output, count only verified tokens as computed, and free the
        blocks that hold nothing but rejected drafts; their slots are overwritten by later tokens.
        Returns, in batch order, the one token left to append for each request (the decode batch
        then advances every row by that one token, having moved these rows on by their drafts)."""
        last_tokens, shifts = list(sampled), []
        for i, request in enumerate(output.requests[: output.num_decodes]):
            drafts = output.spec_token_ids.get(request.request_id)
            if drafts is None or request._batch is not self.batch:
                continue  # no drafts, or aborted since schedule()
            emitted = [sampled[i]] if isinstance(sampled[i], int) else list(sampled[i])
            if not 1 <= len(emitted) <= len(drafts) + 1 or emitted[:-1] != drafts[: len(emitted) - 1]:
                raise ValueError(f"sampled_token_ids: {emitted} do not verify drafts {drafts}")
            emitted = emitted[: request.max_num_tokens - request.num_tokens]
            stop = next((j for j, t in enumerate(emitted) if t in request.stop_set), None)
            *accepted, last_tokens[i] = emitted if stop is None else emitted[: stop + 1]
            request.output_token_ids.extend(accepted)
            self.block_manager.trim(request, request.num_computed_tokens + 1 + len(accepted))
            if accepted:
                shifts.append((request, len(accepted)))
        self.batch.shift(shifts)
        return last_tokens

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

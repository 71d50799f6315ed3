"""The real ``Scheduler`` on a virtual clock: requests arrive as the benchmark's arrival process
says, each step advances the clock by the modelled step time, and what a client would have seen
(first token, every token, the end) is recorded as the benchmark's ``RequestRecord`` so the same
``summarize`` and cost code report it."""

from __future__ import annotations

import dataclasses
import math
import random
import re
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from neuronserve.bench.arrivals import arrival_times
from neuronserve.bench.cost import add_costs
from neuronserve.bench.metrics import RequestRecord, summarize
from neuronserve.bench.workloads import RequestSpec
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.core import Request, Scheduler
from neuronserve.sim.stepmodel import ModelCost, Profile, StepBreakdown, step_time

_PIECES = re.compile(r"\w+|[^\w\s]")
SAMPLED_TOKEN = 1000  # what the simulated sampler "samples" (never a stop token: exact lengths)


def approx_token_ids(text: str, vocab: int = 32000) -> list[int]:
    """Deterministic stand-in token ids, one per word or punctuation mark (about what a BPE
    tokenizer gives for English), so that shared prefixes share ids and hit the prefix cache."""
    return [100 + zlib.crc32(piece.encode()) % (vocab - 100) for piece in _PIECES.findall(text)]


def spec_token_ids(spec: RequestSpec, encode: Callable[[str], list[int]] = approx_token_ids) -> list[int]:
    if spec.is_chat:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in spec.messages)
        return encode(text + "<|im_start|>assistant\n")
    return encode(spec.prompt)


@dataclass
class Speculation:
    """Speculative decoding in the simulator: each decode drafts ``k`` tokens, accepted each with
    probability ``acceptance_rate`` until the first rejection (drawn from a seeded generator);
    no drafts in a step with at least ``disable_by_batch_size`` running requests."""

    k: int
    acceptance_rate: float
    disable_by_batch_size: int | None = None


@dataclass
class SimRequest:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration: float
    steps: list[StepBreakdown] = field(default_factory=list)
    prefix_cache_hits: int = 0
    num_preemptions: int = 0

    def summary(self, slos: dict[str, float] | None = None, price_per_hour: float | None = None) -> dict:
        """The benchmark's own summary (vLLM-named keys), with costs when a price is given."""
        out = summarize(self.records, self.duration, slos)
        return add_costs(out, price_per_hour) if price_per_hour is not None else out

    def breakdown(self) -> dict:
        """Where the virtual time went, summed over steps."""
        keys = ("compute_s", "memory_s", "collective_s", "overhead_s", "total_s")
        return {k: sum(getattr(s, k) for s in self.steps) for k in keys} | {"steps": len(self.steps)}


def simulate(
    requests: Sequence[SimRequest],
    profile: Profile,
    cost: ModelCost,
    scheduler_config: SchedulerConfig,
    cache_config: CacheConfig,
    *,
    concurrency: int | None = None,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    seed: int = 0,
    check_blocks: bool = False,
    speculation: Speculation | None = None,
) -> SimResult:
    """Run ``requests`` through the real scheduler on a virtual clock: all at t=0 with at most
    ``concurrency`` in flight (closed loop), or arriving at ``request_rate`` (open loop, optionally
    capped in flight), as ``neuronserve bench`` sends them. ``speculation``: model speculative
    decoding (see ``Speculation``)."""
    if speculation is not None:
        scheduler_config = dataclasses.replace(scheduler_config, num_speculative_tokens=speculation.k)
    scheduler = Scheduler(scheduler_config, cache_config)
    accept = random.Random(seed)
    arrivals = arrival_times(len(requests), request_rate, burstiness, seed)
    pending = deque(range(len(requests)))
    records: list[RequestRecord | None] = [None] * len(requests)
    in_flight, clock, steps = 0, 0.0, []
    limit = concurrency or len(requests) or 1
    while pending or scheduler.has_unfinished():
        while pending and arrivals[pending[0]] <= clock and in_flight < limit:
            i = pending.popleft()
            req = requests[i]
            scheduler.add_request(
                Request(str(i), req.prompt_token_ids, max_tokens=req.max_tokens, ignore_eos=True)
            )
            records[i] = RequestRecord(sent=max(clock, arrivals[i]), prompt_tokens=len(req.prompt_token_ids))
            in_flight += 1
        if speculation is not None:
            limit_b = speculation.disable_by_batch_size
            drafting = limit_b is None or len(scheduler.running) < limit_b
            for request in scheduler.running:
                request.spec_token_ids = [SAMPLED_TOKEN] * speculation.k if drafting else []
        out = scheduler.schedule()
        if not out.requests:
            if not pending or arrivals[pending[0]] <= clock:  # nothing can run, nothing will arrive
                if scheduler.has_unfinished():
                    raise RuntimeError("the scheduler scheduled nothing with requests waiting")
                break
            clock = arrivals[pending[0]]
            continue
        num_logits = sum(out.num_logits(i) for i in range(len(out)))
        step = step_time(profile, cost, list(zip(out.num_new_tokens, out.num_computed_tokens)), num_logits)
        steps.append(step)
        clock += step.total_s
        sampled: list = [SAMPLED_TOKEN if out.samples(i) else None for i in range(len(out.requests))]
        before = [len(r.output_token_ids) for r in out.requests]
        for i, request in enumerate(out.requests):
            drafts = out.spec_token_ids.get(request.request_id)
            if drafts:
                accepted = 0
                while accepted < len(drafts) and accept.random() < speculation.acceptance_rate:
                    accepted += 1
                sampled[i] = [SAMPLED_TOKEN] * (accepted + 1)
        finished = scheduler.update(out, sampled)
        for i, request in enumerate(out.requests):
            if sampled[i] is not None:
                record = records[int(request.request_id)]
                new_tokens = len(request.output_token_ids) - before[i]
                record.chunk_times.extend([clock] * new_tokens)
                record.output_tokens += new_tokens
        for request in finished:
            record = records[int(request.request_id)]
            record.done, record.ok = clock, True
            in_flight -= 1
        if check_blocks:
            scheduler.block_manager.check_integrity()
    stats = scheduler.stats()
    return SimResult(
        records=[r for r in records if r is not None],
        duration=clock,
        steps=steps,
        prefix_cache_hits=stats.prefix_cache_hits,
        num_preemptions=stats.num_preemptions,
    )

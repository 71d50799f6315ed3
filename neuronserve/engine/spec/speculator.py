"""The engine's side of speculative decoding: who drafts, how many, and what was accepted.

The proposer drafts after each sampled token; the scheduler appends the drafts to the request's
next decode (a ``k + 1``-token chunk) and the runner returns the logits of every position;
``verify_drafts`` decides what is emitted and ``Scheduler.update`` rolls back the rest.

Adaptive: drafting stops for a step once ``disable_by_batch_size`` requests run (a large batch is
compute-bound, so rejected drafts cost real time), and for a request whose recent drafts were
mostly rejected (it retries after a pause, in case the text becomes quotable again). Requests with
penalties or logprobs do not draft: their per-position logits would need per-position state.

Where drafting pays also depends on the machine: a verification step of ``k + 1`` tokens a request
costs little more than a decode while the step is bound by reading the weights, and much more once
it is bound by compute, which on a small CPU happens at a few requests. So the engine reports every
decode-only step (``observe``: batch size, drafted or not, tokens emitted, seconds) and, per batch
size class (powers of two), the speculator drafts only while drafted steps emit more tokens a
second than plain ones (``SpeculativeConfig.adaptive``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from neuronserve.config import SpeculativeConfig
from neuronserve.engine.params import SamplingParams
from neuronserve.engine.spec.ngram import NgramProposer
from neuronserve.engine.spec.verify import verify_drafts

PAUSE_STEPS = 16  # steps a request with a low acceptance rate waits before drafting again
RATE_SMOOTHING = 0.3  # weight of the latest verification in a request's acceptance-rate average
STEP_RATE_SMOOTHING = 0.2  # weight of the latest step in a batch size class's tokens-a-second average
MIN_STEPS = 4  # steps of each kind a class measures before its figures decide
PROBE_EVERY = 16  # every 16th step of a class does the other thing (a plain step while measuring)


@dataclass
class SpecDecodeStats:
    """Totals since the engine started (vLLM's ``spec_decode`` counters)."""

    num_drafts: int = 0  # verifications of at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [j]: drafts accepted at position j

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def acceptance_rate_per_position(self) -> list[float]:
        return [a / self.num_drafts if self.num_drafts else 0.0 for a in self.accepted_per_position]


@dataclass
class DraftRequest:
    """A request about to draft: its tokens so far (the just-emitted ones included)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator


class Proposer(Protocol):
    def propose(self, requests: Sequence[DraftRequest], k: int) -> list[list[int]]: ...

    def draft_probs(self, request_id: str) -> torch.Tensor | None: ...

    def release(self, request_id: str) -> None: ...


class NgramDrafts:
    """The ``Proposer`` face of ``NgramProposer`` (deterministic drafts: a one-hot ``q``)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.lookup = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)

    def propose(self, requests: Sequence[DraftRequest], k: int) -> list[list[int]]:
        return [self.lookup.propose(r.token_ids, k) for r in requests]

    def draft_probs(self, request_id: str) -> torch.Tensor | None:
        return None

    def release(self, request_id: str) -> None:
        pass


class _Acceptance:
    __slots__ = ("rate", "paused_steps")

    def __init__(self) -> None:
        self.rate = 1.0  # optimistic: a new request drafts
        self.paused_steps = 0


class StepRates:
    """One batch size class's decode steps: output tokens a second (a moving average) and how many
    were measured, ``[plain, drafted]``."""

    __slots__ = ("tokens_per_s", "count", "steps")

    def __init__(self) -> None:
        self.tokens_per_s = [0.0, 0.0]
        self.count = [0, 0]
        self.steps = 0  # drafting decisions taken

    def add(self, drafted: bool, tokens: int, seconds: float) -> None:
        i, rate = int(drafted), tokens / max(seconds, 1e-9)
        self.count[i] += 1
        old = self.tokens_per_s[i]
        self.tokens_per_s[i] = rate if self.count[i] == 1 else old + STEP_RATE_SMOOTHING * (rate - old)

    def draft_next(self) -> bool:
        """Whether the class's next step drafts: mostly drafting (with a plain step every
        ``PROBE_EVERY``) until both kinds are measured, then the faster, probing the other."""
        self.steps += 1
        probe = self.steps % PROBE_EVERY == 0
        if min(self.count) < MIN_STEPS:
            return not probe if self.count[0] >= MIN_STEPS else self.steps % 4 != 0
        faster = self.tokens_per_s[1] >= self.tokens_per_s[0]
        return faster != probe


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.proposer = proposer
        self.stats = SpecDecodeStats(accepted_per_position=[0] * self.k)
        self._acceptance: dict[str, _Acceptance] = {}
        self.step_rates: dict[int, StepRates] = {}  # batch size class (bit length) -> its figures

    def observe(self, batch_size: int, drafted: bool, tokens: int, seconds: float) -> None:
        """A decode-only step ran: ``batch_size`` requests, with drafts or not, ``tokens`` emitted
        in ``seconds`` (the model, the verification, the sampling and the next drafts)."""
        if batch_size > 0 and tokens > 0:
            self._rates(batch_size).add(drafted, tokens, seconds)

    def _rates(self, batch_size: int) -> StepRates:
        return self.step_rates.setdefault(batch_size.bit_length(), StepRates())

    def verify(
        self, request_id: str, logits: torch.Tensor, drafts: list[int], params, generator
    ) -> list[int]:
        """Verify one request's drafts (see ``verify_drafts``), counting what was accepted."""
        emitted = verify_drafts(logits, drafts, params, generator, self.proposer.draft_probs(request_id))
        accepted = len(emitted) - 1
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += len(drafts)
        stats.num_accepted_tokens += accepted
        for j in range(accepted):
            stats.accepted_per_position[j] += 1
        state = self._acceptance.setdefault(request_id, _Acceptance())
        state.rate += RATE_SMOOTHING * (accepted / len(drafts) - state.rate)
        if state.rate < self.config.min_acceptance_rate:
            state.rate, state.paused_steps = 1.0, PAUSE_STEPS
        return emitted

    def propose(self, requests: Sequence[DraftRequest], batch_size: int) -> list[list[int]]:
        """Drafts for each request (``[]``: none), given ``batch_size`` running requests."""
        limit = self.config.disable_by_batch_size
        if not requests or (limit is not None and batch_size >= limit):
            return [[] for _ in requests]
        if self.config.adaptive and batch_size > 0 and not self._rates(batch_size).draft_next():
            return [[] for _ in requests]
        drafting = []
        for r in requests:
            state = self._acceptance.setdefault(r.request_id, _Acceptance())
            if state.paused_steps:
                state.paused_steps -= 1
            elif not (r.params.has_penalties or r.params.logprobs is not None):
                drafting.append(r)
        drafts = dict(zip((r.request_id for r in drafting), self.proposer.propose(drafting, self.k)))
        return [drafts.get(r.request_id, []) for r in requests]

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request."""
        self._acceptance.pop(request_id, None)
        self.proposer.release(request_id)


def build_speculator(config: SpeculativeConfig, **draft_kwargs) -> Speculator:
    """The speculator ``config`` describes; a draft model is loaded with ``draft_kwargs`` (see
    ``DraftModelProposer.load``)."""
    if config.method == "ngram":
        return Speculator(config, NgramDrafts(config))
    from neuronserve.engine.spec.draft import DraftModelProposer

    return Speculator(config, DraftModelProposer.load(config, **draft_kwargs))

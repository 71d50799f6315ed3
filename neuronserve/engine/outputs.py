"""What the engine hands back: ``RequestOutput`` (vLLM's shape) with per-request timing."""

from __future__ import annotations

from dataclasses import dataclass, field

from neuronserve.engine.sampler import TokenLogprobs


@dataclass
class RequestMetrics:
    """Timestamps of one request, in seconds on the ``time.monotonic()`` clock."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per generated token
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival until first scheduled."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        """Seconds from arrival to finish."""
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        """Seconds between consecutive generated tokens."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class CompletionOutput:
    """One completion: the text and tokens so far (cumulative) and what is new since the last output.

    The cumulative ``text``, ``token_ids`` and ``logprobs`` are views taken when the output was made:
    the output keeps the request's live (append-only) text, token and logprob lists with their
    lengths at that moment, and copies only when a field is read, so a step costs O(1) per request
    however long its answer (a copy each step would be O(n^2) over a generation).
    """

    index: int
    text_source: object  # has ``.text``: released text never changes, only grows
    num_chars: int
    token_source: list[int]
    num_tokens: int
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs_source: list[TokenLogprobs] | None = None
    num_logprobs: int = 0
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.text_source.text[: self.num_chars]

    @property
    def token_ids(self) -> list[int]:
        return self.token_source[: self.num_tokens]

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return None if self.logprobs_source is None else self.logprobs_source[: self.num_logprobs]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

"""``SamplingParams``: how one request is decoded and when it stops (vLLM's names and ranges)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Below this temperature a request is decoded greedily (as vLLM does).
GREEDY_EPSILON = 1e-5
# OpenAI's range: above it the distribution is nearly uniform, which is never what a client means
# (a temperature of 1e9 once generated to max_model_len: 196 s of noise).
MAX_TEMPERATURE = 2.0
MAX_LOGPROBS = 20


def _fail(field_name: str, message: str) -> None:
    raise ValueError(f"{field_name}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to decode one request. Invalid values raise ``ValueError`` naming the field.

    Attributes:
        max_tokens: most tokens to generate; ``None``: up to the model's context (``max_model_len``).
        temperature: 0 decodes greedily; higher flattens the distribution; at most 2.
        top_p: keep the smallest set of tokens whose probability reaches ``top_p`` (1: off).
        top_k: keep the ``top_k`` most likely tokens (0 or -1: off).
        min_p: drop tokens less likely than ``min_p`` times the most likely one (0: off).
        seed: a per-request seed; the same seed gives the same tokens whatever shares the batch.
        stop: strings that end generation; they are not part of the returned text and are never
            streamed, even in part.
        stop_token_ids: token ids that end generation (besides the model's end-of-sequence token).
        ignore_eos: keep generating past the end-of-sequence token.
        logprobs: also return the log-probabilities of the ``logprobs`` most likely tokens at each
            step (plus the sampled one's), from the model's raw distribution; ``None``: none.
        presence_penalty, frequency_penalty: subtracted from the logits of tokens already generated
            (once, or once per occurrence), in [-2, 2].
        repetition_penalty: divides positive (multiplies negative) logits of tokens in the prompt or
            the output (> 0, as vLLM); 1: off.
        hold_markup: never end a streamed delta inside an unfinished tag such as ``<product id="…"/>``;
            a partial tag is held until its ``>`` arrives, or released as plain text once it is
            longer than ``max_markup_chars``. Text is only delayed, never changed.
        skip_special_tokens: leave special tokens out of the text.
        n: completions per prompt; only 1 is supported.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    hold_markup: bool = False
    max_markup_chars: int = 256
    skip_special_tokens: bool = True
    n: int = 1
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            _fail("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            _fail("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", f"must be an integer >= 1, or 0 or -1 to disable it, got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            _fail("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            _fail("seed", f"must be an integer, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                _fail(name, f"must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            _fail("repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            _fail("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not _is_int(self.max_markup_chars) or self.max_markup_chars < 1:
            _fail("max_markup_chars", f"must be an integer >= 1, got {self.max_markup_chars!r}")
        if self.n != 1:
            _fail("n", f"only n=1 is supported, got {self.n!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            _fail("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_strings = tuple(dict.fromkeys(stop))
        ids = list(self.stop_token_ids or [])
        if not all(_is_int(t) and t >= 0 for t in ids):
            _fail("stop_token_ids", f"must be token ids >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = ids

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing else to compute: the sampler's one-argmax fast path."""
        return self.temperature < GREEDY_EPSILON and self.logprobs is None and not self.has_penalties

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def truncates(self) -> bool:
        """Whether top-k, top-p or min-p narrows the distribution."""
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

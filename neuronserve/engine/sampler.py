"""Batched sampling: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

A seeded request draws from its own ``torch.Generator``, once per generated token, so its tokens do
not depend on what else shares the batch; unseeded requests share the sampler's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from neuronserve.engine.params import SamplingParams


@dataclass
class TokenLogprobs:
    """Log-probabilities at one generated position, from the model's raw distribution."""

    token_id: int  # the sampled token
    logprob: float  # its log-probability
    rank: int  # 1 for the most likely token
    top: dict[int, float]  # the ``logprobs`` most likely tokens, most likely first


@dataclass
class SamplingState:
    """What the sampler needs to know about one request; owned by the engine."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # the request's live list: penalties see every new token
    generator: torch.Generator | None = None
    _seen_prompt: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids, output_token_ids) -> SamplingState:
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        return cls(params, prompt_token_ids, output_token_ids, generator)

    def prompt_ids(self) -> torch.Tensor:
        if self._seen_prompt is None:
            self._seen_prompt = torch.tensor(self.prompt_token_ids, dtype=torch.int64).unique()
        return self._seen_prompt


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        """Sample one token per row of ``logits [B, V]`` (float32) for ``states[b]``."""
        B = logits.shape[0]
        if B == 0:
            return SamplerOutput([], [])
        if all(s.params.plain_greedy for s in states):  # the common case: one argmax, nothing per row
            return SamplerOutput(logits.argmax(-1).tolist(), [None] * B)
        raw = logits
        penalized = [i for i, s in enumerate(states) if s.params.has_penalties]
        if penalized:
            logits = logits.clone()
            for i in penalized:
                apply_penalties(logits[i], states[i])

        token_ids = torch.empty(B, dtype=torch.int64)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        if len(greedy) == B:
            token_ids = logits.argmax(-1)
        elif greedy:
            token_ids[greedy] = logits[greedy].argmax(-1)
        randomized = [i for i, s in enumerate(states) if not s.params.greedy]
        if randomized:
            probs = self._probs([states[i].params for i in randomized], logits[randomized])
            for row, i in enumerate(randomized):
                generator = states[i].generator or self.generator
                token_ids[i] = torch.multinomial(probs[row], 1, generator=generator)[0]

        tokens = token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * B
        wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if wanted:
            for i, entry in zip(wanted, _logprobs(raw[wanted], [tokens[i] for i in wanted], states, wanted)):
                logprobs[i] = entry
        return SamplerOutput(tokens, logprobs)

    @staticmethod
    def _probs(params: list[SamplingParams], logits: torch.Tensor) -> torch.Tensor:
        temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
        logits = logits / temperature[:, None]
        if any(p.truncates for p in params):
            logits = truncate(
                logits,
                top_k=[p.top_k for p in params],
                top_p=[p.top_p for p in params],
                min_p=[p.min_p for p in params],
            )
        return logits.softmax(-1)


def apply_penalties(row: torch.Tensor, state: SamplingState) -> None:
    """Apply repetition, presence and frequency penalties to one row of logits, in place."""
    p = state.params
    output = torch.tensor(state.output_token_ids, dtype=torch.int64)
    if p.repetition_penalty != 1.0:
        seen = torch.cat([state.prompt_ids(), output]).unique()
        values = row[seen]
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if output.numel() and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(output, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def truncate(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]
) -> torch.Tensor:
    """Mask (to -inf) the tokens that top-k, then top-p and min-p drop; one setting per row
    (``top_k`` <= 0, ``top_p`` 1 and ``min_p`` 0 leave a row untouched)."""
    R, V = logits.shape
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
    rank = torch.arange(V)[None, :]
    k = torch.tensor([kk if kk > 0 else V for kk in top_k])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # Keep a token while the probability of the tokens before it is below top_p (the first stays).
    before = probs.cumsum(-1) - probs
    drop = before >= torch.tensor(top_p, dtype=probs.dtype)[:, None]
    drop |= probs < torch.tensor(min_p, dtype=probs.dtype)[:, None] * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _logprobs(raw: torch.Tensor, tokens: list[int], states, rows: list[int]) -> list[TokenLogprobs]:
    logprobs = raw.log_softmax(-1)  # (R, V)
    n_top = max(states[i].params.logprobs for i in rows)
    top_values, top_ids = logprobs.topk(max(n_top, 1), dim=-1)
    chosen = logprobs[torch.arange(len(rows)), torch.tensor(tokens)]
    ranks = (logprobs > chosen[:, None]).sum(-1) + 1
    out = []
    for row, i in enumerate(rows):
        n = states[i].params.logprobs
        top = dict(zip(top_ids[row, :n].tolist(), top_values[row, :n].tolist()))
        out.append(TokenLogprobs(tokens[row], float(chosen[row]), int(ranks[row]), top))
    return out

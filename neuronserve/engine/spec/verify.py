"""Verification of draft tokens against the target model's logits, exact in distribution.

Greedy: keep the longest run of drafts equal to the target's argmax, then emit the argmax at the
first mismatch (or after the last draft): token for token what plain greedy decoding emits.

Sampling (rejection sampling, Leviathan et al. 2023; Chen et al. 2023): the draft ``d`` at a
position is kept with probability ``min(1, p(d) / q(d))``, where ``p`` is the target's sampling
distribution there (temperature, top-k, top-p, min-p applied) and ``q`` the proposer's (one-hot for
a deterministic proposer such as n-gram lookup). The first rejected draft is replaced by a draw
from the normalized residual ``max(p - q, 0)``; if every draft is kept, one more token is drawn from
the next position's ``p``. Each emitted token is then distributed exactly as the target model's own
sampling would give, whatever the proposer proposed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuronserve.engine.params import SamplingParams
from neuronserve.engine.sampler import Sampler


@torch.inference_mode()
def verify_drafts(
    logits: torch.Tensor,
    drafts: Sequence[int],
    params: SamplingParams,
    generator: torch.Generator,
    draft_probs: torch.Tensor | None = None,
) -> list[int]:
    """The tokens to emit: the accepted drafts, then one token from the target.

    ``logits [len(drafts) + 1, V]``: the target's logits at the next token and after each draft.
    ``draft_probs [len(drafts), V]``: the distributions the drafts were sampled from (``None``:
    the drafts were chosen deterministically, a one-hot ``q``)."""
    num_drafts = len(drafts)
    assert logits.shape[0] == num_drafts + 1
    if params.greedy:
        target = logits.argmax(-1).tolist()
        accepted = 0
        while accepted < num_drafts and drafts[accepted] == target[accepted]:
            accepted += 1
        return [*drafts[:accepted], target[accepted]]
    probs = Sampler._probs([params] * (num_drafts + 1), logits)  # (s + 1, V)
    for j, d in enumerate(drafts):
        p = probs[j]
        q_d = 1.0 if draft_probs is None else float(draft_probs[j, d])
        # Keep d with probability min(1, p(d) / q(d)).
        if float(torch.rand((), generator=generator)) * q_d < float(p[d]):
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = (p - draft_probs[j]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is empty
            residual = p
        return [*drafts[:j], int(torch.multinomial(residual, 1, generator=generator))]
    return [*drafts, int(torch.multinomial(probs[num_drafts], 1, generator=generator))]

import math

import pytest
import torch

from neuronserve import SamplingParams
from neuronserve.engine.sampler import Sampler, SamplingState, apply_penalties, truncate


def state(params, prompt=(), output=()):
    return SamplingState.create(params, list(prompt), list(output))


def test_presence_frequency_and_repetition_penalties():
    row = torch.tensor([1.0, -1.0, 2.0, 3.0, 0.5, 4.0])
    p = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=2.0)
    apply_penalties(row, state(p, prompt=[1], output=[3, 3, 5]))
    # repetition (prompt and output): 1 -> *2, 3 -> /2, 5 -> /2; then presence + frequency (output)
    expected = torch.tensor([1.0, -2.0, 2.0, 1.5 - 1.0 - 1.0, 0.5, 2.0 - 1.0 - 0.5])
    torch.testing.assert_close(row, expected)


def test_top_k_top_p_and_min_p_mask_the_tail():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]] * 4)
    logits = probs.log()
    out = truncate(logits, top_k=[2, 0, 0, 0], top_p=[1.0, 0.7, 1.0, 1.0], min_p=[0.0, 0.0, 0.2, 0.0])
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False, False]  # top-k 2
    assert kept[1].tolist() == [True, True, False, False, False]  # 0.5 + 0.25 reaches 0.7
    assert kept[2].tolist() == [True, True, True, False, False]  # >= 0.2 * 0.5
    assert kept[3].all() and torch.equal(out[3], logits[3])


def test_an_all_greedy_batch_is_one_argmax(monkeypatch):
    from neuronserve.engine import sampler as sampler_module

    def forbidden(*args, **kwargs):
        raise AssertionError("a plain greedy batch must not take the per-row path")

    monkeypatch.setattr(sampler_module, "apply_penalties", forbidden)
    monkeypatch.setattr(sampler_module, "_logprobs", forbidden)
    monkeypatch.setattr(Sampler, "_probs", staticmethod(forbidden))
    logits = torch.randn(64, 50)
    out = Sampler()(logits, [state(SamplingParams(temperature=0, max_tokens=4)) for _ in range(64)])
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs == [None] * 64
    # A greedy request with a penalty is not plain: it takes the grouped path.
    assert not SamplingParams(temperature=0, presence_penalty=0.5).plain_greedy
    assert not SamplingParams(temperature=0, logprobs=1).plain_greedy


def test_greedy_and_sampled_rows_share_a_batch():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 9.0], [2.0, 1.0, 0.0]])
    states = [
        state(SamplingParams(temperature=0)),
        state(SamplingParams(temperature=1.0, seed=1)),
        state(SamplingParams(temperature=0, logprobs=2)),
    ]
    out = Sampler()(logits, states)
    assert out.token_ids[0] == 1 and out.token_ids[2] == 0
    assert out.logprobs[0] is None and out.logprobs[2].token_id == 0 and out.logprobs[2].rank == 1
    assert out.logprobs[2].logprob == pytest.approx(math.log(math.exp(2) / (math.exp(2) + math.e + 1)))


def test_seeded_draws_follow_the_distribution_and_repeat():
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(4000, 1)  # P(1) = 0.75
    states = [state(SamplingParams(temperature=1.0, seed=i)) for i in range(4000)]
    first = Sampler()(logits, states).token_ids
    assert abs(sum(first) / 4000 - 0.75) < 0.03
    again = [state(SamplingParams(temperature=1.0, seed=i)) for i in range(4000)]
    assert Sampler(seed=123)(logits, again).token_ids == first

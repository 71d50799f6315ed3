"""Speculative decoding through the engine: greedy output equal to plain decoding token for token
(however many drafts are right), rejection sampling equal in distribution to the target model's
sampling, stop conditions inside accepted drafts, KV blocks all returned, adaptive off-switch."""

from __future__ import annotations

import random

import pytest
import torch

from neuronserve.config import SpeculativeConfig
from neuronserve.engine.engine import Engine
from neuronserve.engine.params import SamplingParams
from neuronserve.engine.spec import NgramProposer, Speculator, build_speculator, verify_drafts
from tests.engine.conftest import assert_all_blocks_free, make_engine, run_to_completion

PROMPTS = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7], list(range(100, 130)), [1, 2, 3, 1, 2, 3, 1, 2]]
GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


class OracleDrafts:
    """Drafts the known greedy continuation of each prompt, each token wrong with ``p_wrong``."""

    def __init__(self, references: list[list[int]], p_wrong: float, seed: int = 0) -> None:
        self.references, self.p_wrong, self.rng = references, p_wrong, random.Random(seed)

    def propose(self, requests, k):
        drafts = []
        for r in requests:
            ref = next((x for x in self.references if x[: len(r.token_ids)] == r.token_ids), [])
            follow = ref[len(r.token_ids) : len(r.token_ids) + k]
            drafts.append([t if self.rng.random() >= self.p_wrong else 3 for t in follow])
        return drafts

    def draft_probs(self, request_id):
        return None

    def release(self, request_id):
        pass


def spec_engine(model, proposer, tokenizer=None, k: int = 3, **config) -> Engine:
    base = make_engine(model, tokenizer)
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=k, **config), proposer)
    return Engine(
        base.runner, tokenizer, base.model_config, base.scheduler_config, base.cache_config, 0, speculator
    )


def generate(engine: Engine, prompts, params) -> list:
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = run_to_completion(engine)
    assert_all_blocks_free(engine)
    return [outputs[i][-1].outputs[0] for i in ids]


@pytest.fixture(scope="module")
def references(tiny_model) -> list[list[int]]:
    outs = generate(make_engine(tiny_model), PROMPTS, GREEDY)
    return [p + o.token_ids for p, o in zip(PROMPTS, outs)]


@pytest.mark.parametrize("p_wrong", [0.0, 0.3, 1.0])
def test_greedy_output_equals_plain_decoding_whatever_the_drafts(tiny_model, references, p_wrong):
    engine = spec_engine(tiny_model, OracleDrafts(references, p_wrong))
    outs = generate(engine, PROMPTS, GREEDY)
    assert [p + o.token_ids for p, o in zip(PROMPTS, outs)] == references
    stats = engine.speculator.stats
    assert stats.num_draft_tokens > 0
    if p_wrong == 0.0:
        assert stats.num_accepted_tokens == stats.num_draft_tokens
        assert engine.scheduler.num_steps < 20  # 30 tokens in far fewer than 30 decode steps
    if p_wrong == 1.0:
        assert stats.num_accepted_tokens == 0


def test_batched_speculation_equals_one_request_at_a_time(tiny_model, references):
    together = generate(spec_engine(tiny_model, OracleDrafts(references, 0.3)), PROMPTS, GREEDY)
    alone = [
        generate(spec_engine(tiny_model, OracleDrafts(references, 0.3)), [p], GREEDY)[0] for p in PROMPTS
    ]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_ngram_lookup_end_to_end_is_exact(tiny_model, references):
    """(A random model never quotes its prompt, so few drafts are right here: the SmolLM2 test in
    tests/model shows lookup's acceptance; this one that its plumbing changes nothing.)"""
    base = make_engine(tiny_model)
    speculator = build_speculator(SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1))
    engine = Engine(
        base.runner, None, base.model_config, base.scheduler_config, base.cache_config, 0, speculator
    )
    outs = generate(engine, PROMPTS, GREEDY)
    assert [p + o.token_ids for p, o in zip(PROMPTS, outs)] == references


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 11])
def test_max_tokens_and_stop_tokens_inside_accepted_drafts(tiny_model, references, max_tokens):
    stop = references[0][len(PROMPTS[0]) + 5]
    for params in (
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=[stop]),
    ):
        plain = generate(make_engine(tiny_model), PROMPTS, params)
        spec = generate(spec_engine(tiny_model, OracleDrafts(references, 0.0)), PROMPTS, params)
        assert [(o.token_ids, o.finish_reason, o.stop_reason) for o in spec] == [
            (o.token_ids, o.finish_reason, o.stop_reason) for o in plain
        ]


def test_stop_string_inside_accepted_drafts_drops_the_tokens_after_it(tiny_model, tokenizer, references):
    generated = references[1][len(PROMPTS[1]) :]
    stop = tokenizer.decode(generated[6:8])
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    plain = generate(make_engine(tiny_model, tokenizer), PROMPTS[1:2], params)[0]
    spec = generate(spec_engine(tiny_model, OracleDrafts(references, 0.0), tokenizer), PROMPTS[1:2], params)[
        0
    ]
    assert plain.finish_reason == "stop" and len(plain.token_ids) < 30
    assert (spec.text, spec.token_ids, spec.stop_reason) == (plain.text, plain.token_ids, plain.stop_reason)


def test_seeded_sampling_with_speculation_is_reproducible(tiny_model, references):
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    runs = [
        generate(spec_engine(tiny_model, OracleDrafts(references, 0.3)), PROMPTS, params) for _ in range(2)
    ]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]


def test_no_drafts_for_penalties_logprobs_or_a_large_batch(tiny_model, references):
    for params, config in (
        (SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.2), {}),
        (SamplingParams(max_tokens=10, temperature=0, logprobs=2), {}),
        (GREEDY, {"disable_by_batch_size": 1}),  # any batch is "large": speculation is off
    ):
        engine = spec_engine(tiny_model, OracleDrafts(references, 0.0), **config)
        generate(engine, PROMPTS, params)
        assert engine.speculator.stats.num_draft_tokens == 0


def test_a_request_whose_drafts_keep_failing_pauses_drafting(tiny_model, references):
    engine = spec_engine(tiny_model, OracleDrafts(references, 1.0), min_acceptance_rate=0.5)
    generate(engine, PROMPTS[:1], GREEDY)
    # Without the pause every one of the ~30 steps would verify drafts.
    assert 0 < engine.speculator.stats.num_drafts < 10


def test_the_batch_size_switch_turns_a_whole_step_off(references):
    speculator = Speculator(SpeculativeConfig(disable_by_batch_size=8), OracleDrafts(references, 0.0))
    from neuronserve.engine.spec import DraftRequest

    request = DraftRequest("a", PROMPTS[0], GREEDY, torch.Generator())
    assert speculator.propose([request], batch_size=7) != [[]]
    assert speculator.propose([request], batch_size=8) == [[]]


def drafting_steps(speculator, batch_size: int, steps: int = 32) -> int:
    from neuronserve.engine.spec import DraftRequest

    request = DraftRequest("a", PROMPTS[0], GREEDY, torch.Generator())
    return sum(speculator.propose([request], batch_size) != [[]] for _ in range(steps))


def test_drafting_stops_where_drafted_steps_emit_fewer_tokens_a_second(references):
    """Measured per batch size class: at 8 requests drafted steps are slower here (a compute-bound
    step), at 1 they are faster; each class keeps probing the other way one step in 16."""
    speculator = Speculator(SpeculativeConfig(disable_by_batch_size=None), OracleDrafts(references, 0.0))
    for _ in range(6):
        speculator.observe(8, drafted=False, tokens=8, seconds=0.010)  # 800 tokens/s
        speculator.observe(8, drafted=True, tokens=14, seconds=0.025)  # 560 tokens/s
        speculator.observe(1, drafted=False, tokens=1, seconds=0.010)  # 100 tokens/s
        speculator.observe(1, drafted=True, tokens=3, seconds=0.014)  # 214 tokens/s
    assert drafting_steps(speculator, 8) == 2  # the probes only
    assert drafting_steps(speculator, 1) == 30  # all but the probes
    # The figures move with what is measured: drafting at 8 becomes the faster.
    for _ in range(20):
        speculator.observe(8, drafted=True, tokens=30, seconds=0.025)
    assert drafting_steps(speculator, 8) == 30


def test_until_both_kinds_are_measured_a_class_mostly_drafts(references):
    speculator = Speculator(SpeculativeConfig(disable_by_batch_size=None), OracleDrafts(references, 0.0))
    assert drafting_steps(speculator, 4, steps=16) == 12  # a plain step in 4, to measure one
    for _ in range(4):
        speculator.observe(4, drafted=False, tokens=4, seconds=0.01)
    assert drafting_steps(speculator, 4, steps=16) == 15  # the plain figure is known: draft, probe


def test_without_adaptive_every_step_drafts(references):
    speculator = Speculator(SpeculativeConfig(adaptive=False), OracleDrafts(references, 0.0))
    for _ in range(6):
        speculator.observe(2, drafted=False, tokens=2, seconds=0.01)
        speculator.observe(2, drafted=True, tokens=2, seconds=1.0)
    assert drafting_steps(speculator, 2) == 32


def test_the_engine_reports_its_decode_steps(tiny_model, references):
    engine = spec_engine(tiny_model, OracleDrafts(references, 0.0))
    generate(engine, PROMPTS, GREEDY)
    rates = engine.speculator.step_rates
    measured = sum(sum(r.count) for r in rates.values())
    assert rates and measured > 0 and all(r.tokens_per_s[1] > 0 for r in rates.values() if r.count[1])
    assert engine.speculator.stats.num_accepted_tokens > 0


# ---------------------------------------------------------------- rejection sampling, statistically
def _first_two(logits, drafts, params, draft_probs, trials: int, seed: int = 0):
    """Histograms of the first emitted token and of the token after an accepted first draft. With
    ``draft_probs`` the drafts are drawn from them anew each trial, as a draft model does."""
    generator = torch.Generator().manual_seed(seed)
    V = logits.shape[1]
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(trials):
        if draft_probs is not None:
            drafts = torch.multinomial(draft_probs, 1, generator=generator)[:, 0].tolist()
        emitted = verify_drafts(logits, drafts, params, generator, draft_probs)
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    return first / first.sum(), second / second.sum()


@pytest.mark.parametrize("proposer", ["one-hot", "distribution"])
def test_rejection_sampling_keeps_the_target_distribution(proposer):
    """On a 6-token vocabulary: the first emitted token follows the target's p at position 0, and
    the token after an accepted draft follows p at position 1 (total variation < 0.04 over 4000
    fixed-seed trials, where a biased verifier is off by 0.1 or more)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6) * 1.5
    params = SamplingParams(temperature=0.9, top_k=5)
    draft_probs, drafts = None, []
    if proposer == "distribution":
        draft_probs = torch.softmax(torch.randn(2, 6), -1)
    else:
        drafts = [
            int(logits[0].topk(2).indices[1]),
            int(logits[1].argmax()),
        ]  # the 2nd likeliest, the likeliest
    from neuronserve.engine.sampler import Sampler

    target = Sampler._probs([params] * 3, logits)
    first, second = _first_two(logits, drafts, params, draft_probs, trials=4000)
    assert 0.5 * (first - target[0]).abs().sum() < 0.04
    assert 0.5 * (second - target[1]).abs().sum() < 0.04


def test_greedy_verification_accepts_the_argmax_prefix():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    g = torch.Generator()
    assert verify_drafts(logits, [1, 0], SamplingParams(temperature=0), g) == [1, 0, 2]
    assert verify_drafts(logits, [1, 2], SamplingParams(temperature=0), g) == [1, 0]
    assert verify_drafts(logits, [2, 0], SamplingParams(temperature=0), g) == [1]


# ---------------------------------------------------------------- n-gram lookup and config
def test_ngram_proposes_the_continuation_of_the_latest_longest_match():
    lookup = NgramProposer(min_n=1, max_n=3)
    assert lookup.propose([1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 2, 3, 4], k=2) == [6, 7]  # latest match
    assert lookup.propose([1, 2, 3, 8, 9, 5, 2, 3], k=3) == [8, 9, 5]
    assert lookup.propose([7, 1, 2, 1, 2], k=4) == [1, 2]  # n=2 match at 1, n=3 none
    assert lookup.propose([1, 2, 3], k=2) == [] and lookup.propose([4], k=2) == []
    assert NgramProposer(min_n=2, max_n=3).propose([5, 1, 9, 1], k=2) == []  # only a 1-gram matches


@pytest.mark.parametrize(
    "config, field",
    [
        ({"method": "medusa"}, "speculative_config.method"),
        ({"num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
        ({"method": "draft_model"}, "speculative_config.model"),
        ({"model": "x"}, "speculative_config.model"),
        ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "speculative_config.prompt_lookup_min"),
        ({"min_acceptance_rate": 1.5}, "speculative_config.min_acceptance_rate"),
        ({"num_spec_tokens": 3}, "speculative_config"),
    ],
)
def test_speculative_config_errors_name_the_field(config, field):
    with pytest.raises(ValueError, match=f"^{field.replace('.', '[.]')}:"):
        SpeculativeConfig.from_dict(config)


def test_metrics_and_cli_flag():
    import argparse
    from types import SimpleNamespace

    from neuronserve.cli import _speculative_config
    from neuronserve.engine.spec import SpecDecodeStats
    from neuronserve.server.metrics import ServerMetrics

    stats = SpecDecodeStats(
        num_drafts=4, num_draft_tokens=12, num_accepted_tokens=7, accepted_per_position=[4, 2, 1]
    )
    scheduler = make_engine_stub_scheduler()
    engine = SimpleNamespace(scheduler=scheduler, speculator=SimpleNamespace(stats=stats))
    text = ServerMetrics(lambda: engine).render().decode()
    assert "neuronserve:spec_decode_num_draft_tokens_total 12.0" in text
    assert "neuronserve:spec_decode_num_accepted_tokens_total 7.0" in text
    assert 'neuronserve:spec_decode_num_accepted_tokens_per_pos_total{position="1"} 2.0' in text

    args = argparse.Namespace(speculative_config='{"method": "ngram", "num_speculative_tokens": 5}')
    assert _speculative_config(args) == SpeculativeConfig(num_speculative_tokens=5)
    with pytest.raises(ValueError, match="^speculative_config: not JSON"):
        _speculative_config(argparse.Namespace(speculative_config="{method: ngram}"))


def make_engine_stub_scheduler():
    from tests.core.conftest import make_scheduler

    return make_scheduler()


# ---------------------------------------------------------------- draft model
def draft_engine(target, draft, k: int = 3) -> Engine:
    from neuronserve.backends import get_backend
    from neuronserve.engine.spec.draft import DraftModelProposer

    base = make_engine(target)
    runner = get_backend("cpu").build_runner(draft, draft.config, base.cache_config, base.scheduler_config)
    proposer = DraftModelProposer(runner, target.config.vocab_size)
    config = SpeculativeConfig(method="draft_model", model="(in memory)", num_speculative_tokens=k)
    return Engine(
        base.runner,
        None,
        base.model_config,
        base.scheduler_config,
        base.cache_config,
        0,
        Speculator(config, proposer),
    )


@pytest.fixture(scope="module")
def tiny_draft():
    from neuronserve.model.llama import LlamaForCausalLM
    from tests.engine.conftest import tiny_config

    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


def test_a_draft_model_drafting_for_itself_is_always_accepted(tiny_model, references):
    engine = draft_engine(tiny_model, tiny_model)
    outs = generate(engine, PROMPTS, GREEDY)
    assert [p + o.token_ids for p, o in zip(PROMPTS, outs)] == references
    stats = engine.speculator.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    bm = engine.speculator.proposer.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_usable_blocks  # the draft's blocks came back too


def test_a_different_draft_model_keeps_greedy_exact_and_sampling_reproducible(
    tiny_model, tiny_draft, references
):
    engine = draft_engine(tiny_model, tiny_draft)
    outs = generate(engine, PROMPTS, GREEDY)
    assert [p + o.token_ids for p, o in zip(PROMPTS, outs)] == references
    assert engine.speculator.stats.num_draft_tokens > 0
    params = SamplingParams(max_tokens=15, temperature=1.0, seed=3, ignore_eos=True)
    runs = [
        [o.token_ids for o in generate(draft_engine(tiny_model, tiny_draft), PROMPTS, params)]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]

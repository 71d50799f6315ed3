"""The engine against its oracles: each request's solo output, the scripted token stream, and the
block manager's integrity."""

import pytest
import torch

from neuronserve import SamplingParams
from neuronserve.core import QueueFullError
from tests.engine.conftest import EOS, ScriptedRunner, assert_all_blocks_free, make_engine, run_to_completion

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of 3..40 tokens; every third shares a 12-token prefix with the first."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 40000, (12,), generator=gen).tolist()
    prompts = []
    for i in range(n):
        length = 3 + (i * 7) % 38
        tail = torch.randint(3, 40000, (length,), generator=gen).tolist()
        prompts.append(shared + tail if i % 3 == 0 else tail)
    return prompts


def generate(engine, prompts, params, arrive_at=None) -> list[list[int]]:
    """Add prompt ``i`` before step ``arrive_at[i]``; return each request's final tokens."""
    arrive_at = arrive_at or [0] * len(prompts)
    final, step = {}, 0
    while len(final) < len(prompts):
        for i, prompt in enumerate(prompts):
            if arrive_at[i] == step:
                p = params[i] if isinstance(params, list) else params
                engine.add_request(prompt, p, request_id=str(i))
        for out in engine.step():
            if out.finished:
                final[int(out.request_id)] = out.outputs[0].token_ids
        engine.scheduler.block_manager.check_integrity()
        step += 1
    assert_all_blocks_free(engine)
    return [final[i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(16)


@pytest.fixture(scope="module")
def solo(tiny_model, prompts):
    return [generate(make_engine(tiny_model, enable_prefix_caching=False), [p], GREEDY)[0] for p in prompts]


ARRIVALS = [0, 0, 0, 1, 1, 2, 3, 3, 5, 6, 8, 9, 12, 13, 15, 20]


@pytest.mark.parametrize("caching", [False, True])
def test_continuous_batching_gives_each_request_its_solo_tokens(tiny_model, prompts, solo, caching):
    assert len({len(p) for p in prompts}) > 10 and len({tuple(t) for t in solo}) == 16
    engine = make_engine(tiny_model, enable_prefix_caching=caching)
    assert generate(engine, prompts, GREEDY, ARRIVALS) == solo
    stats = engine.scheduler.stats()
    assert (stats.prefix_cache_hits > 0) == caching


def test_preemption_by_recompute_gives_the_same_tokens(tiny_model, prompts, solo):
    engine = make_engine(tiny_model, num_blocks=22, max_model_len=64)  # 21 blocks of 4 tokens: tight
    assert generate(engine, prompts, GREEDY, ARRIVALS) == solo
    assert engine.scheduler.stats().num_preemptions > 0


def test_a_seeded_request_samples_the_same_tokens_in_any_batch(tiny_model, prompts):
    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=200, seed=1234, ignore_eos=True)
    alone = generate(make_engine(tiny_model), [prompts[5]], seeded)[0]
    others = [
        SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True),  # unseeded: shares the generator
        SamplingParams(max_tokens=12, temperature=0.7, seed=99, min_p=0.05, ignore_eos=True),
        GREEDY,
        SamplingParams(max_tokens=5, temperature=1.3, presence_penalty=1.0, frequency_penalty=0.5),
    ]
    batch = [prompts[0], prompts[5], prompts[9], prompts[2], prompts[11]]
    params = [others[0], seeded, others[1], others[2], others[3]]
    for arrive_at in ([0, 0, 0, 0, 0], [0, 2, 1, 3, 0], [1, 0, 0, 0, 0]):
        assert generate(make_engine(tiny_model, seed=7), batch, params, arrive_at)[1] == alone
    assert alone != generate(make_engine(tiny_model), [prompts[5]], GREEDY)[0][:12]


def test_logprobs_are_the_raw_distribution(tiny_model, prompts):
    engine = make_engine(tiny_model)
    engine.add_request(prompts[1], SamplingParams(max_tokens=4, temperature=0, logprobs=3), request_id="a")
    out = run_to_completion(engine)["a"][-1].outputs[0]
    assert len(out.logprobs) == 4
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.rank == 1  # greedy takes the most likely token
        assert list(lp.top)[0] == token and len(lp.top) == 3
        values = list(lp.top.values())
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


# ---------------------------------------------------------------- scripted token streams
TEXT = 'Try the <product id="B0C1234567"/> blender. Or <product id="B0C7654321"/>, both crush ice. END of it'


def scripted(tokenizer, params, text=TEXT, extra=()):
    ids = tokenizer.encode(text, add_special_tokens=False) + list(extra)
    engine = make_engine(ScriptedRunner({"r": ids}), tokenizer)
    engine.add_request("Which blender?", params, request_id="r")
    return ids, run_to_completion(engine)["r"], engine


def test_stop_strings_end_the_text_and_never_stream(tokenizer):
    ids, outs, engine = scripted(tokenizer, SamplingParams(max_tokens=100, stop=["ice. EN", "never"]))
    final = outs[-1].outputs[0]
    assert final.text == TEXT[: TEXT.index("ice. EN")] and final.finish_reason == "stop"
    assert final.stop_reason == "ice. EN"
    assert "".join(o.outputs[0].delta_text for o in outs) == final.text
    assert all(final.text.startswith(o.outputs[0].text) for o in outs)
    assert len(final.token_ids) < len(ids)
    assert_all_blocks_free(engine)


def test_stop_token_ids_eos_ignore_eos_and_max_tokens(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    _, outs, _ = scripted(tokenizer, SamplingParams(max_tokens=100, stop_token_ids=[ids[4]]))
    final = outs[-1].outputs[0]
    assert final.token_ids == ids[:5] and final.finish_reason == "stop" and final.stop_reason == ids[4]
    assert final.text == tokenizer.decode(ids[:4])  # the stop token's text is not part of the output

    with_eos = TEXT[:20]
    _, outs, _ = scripted(tokenizer, SamplingParams(max_tokens=100), text=with_eos, extra=[EOS, 300, 301])
    final = outs[-1].outputs[0]
    assert final.token_ids[-1] == EOS and final.finish_reason == "stop" and final.stop_reason is None
    assert final.text == with_eos

    _, outs, _ = scripted(
        tokenizer, SamplingParams(max_tokens=30, ignore_eos=True), text=with_eos, extra=[EOS]
    )
    final = outs[-1].outputs[0]
    assert len(final.token_ids) == 30 and final.finish_reason == "length"

    _, outs, _ = scripted(tokenizer, SamplingParams(max_tokens=7))
    assert len(outs[-1].outputs[0].token_ids) == 7 and outs[-1].outputs[0].finish_reason == "length"
    assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, 8))  # one output per token


def test_hold_markup_never_streams_a_partial_tag(tokenizer):
    ids, outs, _ = scripted(tokenizer, SamplingParams(max_tokens=100, hold_markup=True, stop=["END"]))
    tokens_inside_tags = sum("<" in tokenizer.decode([t]) for t in ids)
    assert tokens_inside_tags >= 2 and len(ids) > 30  # the tags really are split over tokens
    final = outs[-1].outputs[0].text
    assert final == TEXT[: TEXT.index("END")]  # tags intact
    for out in outs[:-1]:
        text = out.outputs[0].text
        assert text.count("<") == text.count(">"), text  # every streamed prefix closes its tags
    assert "".join(o.outputs[0].delta_text for o in outs) == final
    # Without hold_markup the same stream does end inside a tag.
    _, plain, _ = scripted(tokenizer, SamplingParams(max_tokens=100, stop=["END"]))
    assert any(o.outputs[0].text.count("<") != o.outputs[0].text.count(">") for o in plain)


# ---------------------------------------------------------------- aborts and bad input
def test_abort_mid_stream_frees_every_block(tiny_model, prompts):
    engine = make_engine(tiny_model, num_blocks=64)
    for i, p in enumerate(prompts[:6]):
        engine.add_request(
            p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), request_id=str(i)
        )
    for _ in range(4):
        engine.step()
    assert engine.scheduler.block_manager.num_free_blocks < 63
    aborted = engine.abort("2")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert engine.abort("2") is None and engine.abort("nope") is None
    engine.scheduler.block_manager.check_integrity()
    finished = run_to_completion(engine)
    assert "2" not in finished or not finished["2"][-1].finished
    for rid in ("0", "1", "3", "4", "5"):
        assert len(finished[rid][-1].outputs[0].token_ids) == 20
    assert_all_blocks_free(engine)


def test_bad_requests_raise_and_leave_nothing_behind(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer, max_waiting=2, max_model_len=64)
    with pytest.raises(ValueError, match="^prompt: token id 49152 is outside the vocabulary"):
        engine.add_request([1, 49152])
    with pytest.raises(ValueError, match="^max_tokens: .*exceed max_model_len=64"):
        engine.add_request(list(range(3, 60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="^prompt: 64 tokens leave no room"):
        engine.add_request(list(range(3, 67)), SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="^prompt_token_ids: the prompt is empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="^prompt: expected text or a list of token ids"):
        engine.add_request({"text": "hi"})
    with pytest.raises(ValueError, match="^params: expected SamplingParams"):
        engine.add_request("hi", {"max_tokens": 3})
    engine.add_request("hello", request_id="a")
    with pytest.raises(ValueError, match="^request_id: 'a' is already in use"):
        engine.add_request("hello again", request_id="a")
    engine.add_request("hello", request_id="b")
    with pytest.raises(QueueFullError):
        engine.add_request("one too many")
    assert engine.num_unfinished == 2
    outputs = run_to_completion(engine)
    assert sorted(outputs) == ["a", "b"]
    assert_all_blocks_free(engine)


def test_max_tokens_none_runs_to_the_context_limit(tiny_model):
    engine = make_engine(tiny_model, max_model_len=40)
    engine.add_request(list(range(5, 35)), SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
    (outs,) = run_to_completion(engine).values()
    assert len(outs[-1].outputs[0].token_ids) == 10 and outs[-1].outputs[0].finish_reason == "length"


def test_metrics_are_timestamped(tiny_model, prompts):
    engine = make_engine(tiny_model)
    engine.add_request(
        prompts[4], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), request_id="m"
    )
    m = run_to_completion(engine)["m"][-1].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert len(m.token_times) == 5 and len(m.inter_token_latencies) == 4
    assert m.time_to_first_token > 0 and m.e2e_latency >= m.time_to_first_token and m.queue_time >= 0


def test_the_cpu_traced_backend_gives_each_request_its_solo_tokens(tiny_model, prompts, solo, tmp_path):
    """The same engine over per-bucket exported graphs (every step padded to a static shape)."""
    import copy

    from neuronserve.backends import get_backend
    from neuronserve.config import CacheConfig, CompileConfig, SchedulerConfig

    sched = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128, token_buckets=(8, 16, 32, 64)
    )
    cache = CacheConfig(block_size=4, num_blocks=256)
    compile_config = CompileConfig(context_buckets=(32,), artifact_cache=str(tmp_path), progress=False)
    runner = get_backend("cpu-traced").build_runner(
        copy.deepcopy(tiny_model), tiny_model.config, cache, sched, compile_config
    )
    engine = make_engine(runner)
    assert generate(engine, prompts, GREEDY, ARRIVALS) == solo
    assert len(runner.calls) > 2  # several buckets ran


def test_outputs_are_views_taken_when_made_not_per_step_copies(tiny_model, tokenizer):
    """Each step's output reads as it was when made, though it copies nothing while the request runs."""
    engine = make_engine(tiny_model, tokenizer)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), "r")
    live = engine._tracked["r"].request.output_token_ids
    seen = []
    while engine.has_unfinished():
        for out in engine.step():
            c = out.outputs[0]
            assert c.token_source is live  # shared, not copied
            seen.append((c, list(c.token_ids), c.text))
    for c, token_ids, text in seen:  # read again after the request finished: the same snapshot
        assert c.token_ids == token_ids and c.text == text
    assert [len(t) for _, t, _ in seen] == list(range(1, 13))
    assert "".join(c.delta_text for c, _, _ in seen) == seen[-1][2]

"""The simulator drives the real scheduler: its invariants hold at every step, every request gets
exactly its tokens, and the report is the benchmark's."""

import math
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from neuronserve.config import CacheConfig, ModelConfig, SchedulerConfig
from neuronserve.sim.simulator import SimRequest, approx_token_ids, simulate
from neuronserve.sim.stepmodel import ModelCost, Profile

CONFIG = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
PROFILE = Profile("test", peak_flops=1e9, mem_bytes_per_s=1e9, step_overhead_s=1e-3)
SCHED = SchedulerConfig(
    max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96, token_buckets=(8, 16, 32), max_waiting=None
)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 30)), min_size=1, max_size=12),
    shared=st.integers(0, 20),
    blocks=st.integers(25, 60),  # >= one max_model_len request; tight enough to preempt
    concurrency=st.one_of(st.none(), st.integers(1, 6)),
    rate=st.sampled_from([math.inf, 50.0, 500.0]),
)
def test_invariants_hold_and_every_request_gets_its_tokens(lengths, shared, blocks, concurrency, rate):
    prefix = list(range(7, 7 + shared))
    requests = [SimRequest(prefix + [100 + i] * p, out) for i, (p, out) in enumerate(lengths)]
    requests = [
        SimRequest(r.prompt_token_ids[:90], min(r.max_tokens, 96 - len(r.prompt_token_ids[:90])))
        for r in requests
    ]
    cache = CacheConfig(block_size=4, num_blocks=blocks)
    result = simulate(requests, PROFILE, ModelCost(CONFIG), SCHED, cache, concurrency=concurrency,
                      request_rate=rate, check_blocks=True)  # fmt: skip
    assert len(result.records) == len(requests)
    for record, request in zip(result.records, requests):
        assert record.ok and record.output_tokens == request.max_tokens == len(record.chunk_times)
        assert record.sent <= record.chunk_times[0] and record.chunk_times == sorted(record.chunk_times)
        assert record.done == record.chunk_times[-1]
    summary = result.summary()
    assert summary["completed"] == len(requests) and summary["duration"] == result.duration


def test_a_closed_loop_keeps_at_most_concurrency_in_flight():
    requests = [SimRequest([5 + i] * 10, 5) for i in range(6)]
    result = simulate(
        requests, PROFILE, ModelCost(CONFIG), SCHED, CacheConfig(block_size=4, num_blocks=64), concurrency=2
    )
    spans = sorted((r.sent, r.done) for r in result.records)
    for t, _ in spans:
        assert sum(1 for s, d in spans if s <= t < d) <= 2


def test_the_shared_system_prompt_hits_the_prefix_cache():
    system = approx_token_ids("You are a helpful shopping assistant. " * 6)
    requests = [SimRequest(system + approx_token_ids(f"question {i} about kettles"), 4) for i in range(5)]
    result = simulate(
        requests, PROFILE, ModelCost(CONFIG), SCHED, CacheConfig(block_size=4, num_blocks=128), concurrency=1
    )
    assert result.prefix_cache_hits >= 4 * (len(system) // 4 * 4)


def test_the_simulator_imports_no_torch():
    modules = "neuronserve.sim.simulator, neuronserve.sim.planner, neuronserve.sim.stepmodel"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_tight_pool_preempts_and_still_completes_everything():
    requests = [SimRequest([9 + i] * 80, 16) for i in range(6)]
    result = simulate(requests, PROFILE, ModelCost(CONFIG), SCHED, CacheConfig(block_size=4, num_blocks=30),
                      check_blocks=True)  # fmt: skip
    assert result.num_preemptions > 0
    assert all(r.ok and r.output_tokens == 16 for r in result.records)

"""The simulator models speculative decoding: every request still gets exactly its tokens (with
the real scheduler's drafts, acceptance and rollback, blocks checked every step), in fewer steps
the higher the acceptance rate; the step model says it pays at small batches and not at large."""

from neuronserve.config import CacheConfig
from neuronserve.sim.simulator import SimRequest, Speculation, simulate
from neuronserve.sim.stepmodel import ModelCost, Profile, expected_tokens_per_step, speculative_speedup
from tests.sim.test_simulator import CONFIG, PROFILE, SCHED


def test_speculation_keeps_every_token_and_saves_steps():
    requests = [SimRequest(list(range(10 + i, 30 + i)), 40) for i in range(6)]
    cache = CacheConfig(block_size=4, num_blocks=80)
    steps = {}
    for rate in (None, 0.0, 0.6, 1.0):
        spec = None if rate is None else Speculation(k=3, acceptance_rate=rate)
        result = simulate(requests, PROFILE, ModelCost(CONFIG), SCHED, cache, concurrency=2,
                          check_blocks=True, speculation=spec)  # fmt: skip
        assert [r.output_tokens for r in result.records] == [40] * 6
        assert all(len(r.chunk_times) == 40 for r in result.records)
        steps[rate] = len(result.steps)
    assert steps[1.0] < steps[0.6] < steps[0.0] == steps[None]


def test_expected_tokens_and_where_speculation_pays():
    assert expected_tokens_per_step(4, 0.0) == 1.0 and expected_tokens_per_step(4, 1.0) == 5.0
    assert abs(expected_tokens_per_step(2, 0.5) - 1.75) < 1e-9
    cost = ModelCost(CONFIG)
    bandwidth_bound = Profile("hbm", peak_flops=1e10, mem_bytes_per_s=1e9)
    speedups = [speculative_speedup(bandwidth_bound, cost, b, 100, 4, 0.7) for b in (1, 8, 64)]
    assert speedups[0] > 2.0 and speedups[0] >= speedups[1] >= speedups[2] and speedups[2] < 1.0

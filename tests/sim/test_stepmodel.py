"""Step-time terms against hand-computed cases."""

import math

import pytest

from neuronserve.config import ModelConfig
from neuronserve.sim.stepmodel import ModelCost, Profile, step_time

# hidden 8, 2 query heads of 4, 1 KV head, intermediate 16, vocab 100, 2 layers
CONFIG = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
PROFILE = Profile(
    "hand", peak_flops=1e6, mem_bytes_per_s=1e3, step_overhead_s=0.1, seq_overhead_s=0.01, overlap=False
)
CHUNKS = [(3, 0), (1, 5)]  # a 3-token prefill from position 0; a decode at position 5


def test_bytes_flops_and_time_of_one_step_at_tp1():
    cost = ModelCost(CONFIG, 1, weight_bytes=2, kv_bytes=2)
    # per layer: qkv 8x(8+4+4) + o 8x8 + gate/up/down 3x8x16 = 576 parameters; LM head 100x8
    assert cost.linear_params == 576 and cost.head_params == 800
    b = step_time(PROFILE, cost, CHUNKS)
    assert (b.tokens, b.seqs) == (4, 2)
    assert b.weight_bytes == 2 * 576 * 2 + 800 * 2  # 3904
    # context read (3 + 6) plus the 4 new tokens written: 2 layers x K,V x 4 dims x 2 bytes each
    assert b.kv_bytes == 2 * 2 * 4 * 2 * (9 + 4)
    # linear 2x4x2x576 + attention 4x4x2 heads x (1+2+3 + 6) x 2 layers + logits 2x2x800
    assert b.flops == 9216 + 768 + 3200
    assert b.compute_s == pytest.approx(13184 / 1e6)
    assert b.memory_s == pytest.approx((3904 + 416) / 1e3)
    assert b.overhead_s == pytest.approx(0.12) and b.collective_s == 0
    assert b.total_s == pytest.approx(0.12 + 13184 / 1e6 + 4320 / 1e3)  # compute and memory add up


def test_overlap_takes_the_larger_and_efficiencies_divide():
    cost = ModelCost(CONFIG, 1, weight_bytes=2, kv_bytes=2)
    profile = Profile("x", peak_flops=1e6, mem_bytes_per_s=1e3, memory_eff=0.5, kv_eff=0.25, compute_eff=0.1)
    b = step_time(profile, cost, CHUNKS)
    assert b.memory_s == pytest.approx(3904 / 500 + 416 / 250)
    assert b.compute_s == pytest.approx(13184 / 1e5)
    assert b.total_s == pytest.approx(max(b.memory_s, b.compute_s))


def test_tp2_collectives_and_quantized_weights():
    profile = Profile(
        "x", peak_flops=1e6, mem_bytes_per_s=1e3, link_bytes_per_s=1e3, collective_latency_s=0.001
    )
    cost = ModelCost(CONFIG, 2, weight_bytes=2, kv_bytes=2, act_bytes=2)
    # 1 KV head over 2 ranks: replicated; 2 query heads: one a rank
    assert (cost.q_dim, cost.kv_dim) == (4, 4)
    b = step_time(profile, cost, CHUNKS)
    # 5 all-reduces of 4 tokens x 8 x 2 bytes, ring factor 2x(2-1)/2 = 1;
    # one gather of 2 x 100 fp32 logits, half of them remote
    assert b.collective_s == pytest.approx(5 * (0.001 + 64 / 1e3) + 0.001 + 400 / 1e3)
    int8 = ModelCost(CONFIG, 1, weight_bytes=2, quantization="int8")
    assert int8.weight_read_bytes() == pytest.approx(2 * 576 * 1 * 1.01 + 800 * 2)


def test_an_empty_step_costs_nothing():
    b = step_time(PROFILE, ModelCost(CONFIG), [])
    assert b.total_s == 0 and not math.isnan(b.total_s)

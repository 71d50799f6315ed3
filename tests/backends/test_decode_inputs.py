"""Persistent decode-step inputs equal the tensors rebuilt from the scheduler's lists, step by step."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronserve.backends.inputs import DecodeInputs, build_step_inputs, chunks_from_output
from neuronserve.core import CacheConfig, Request, Scheduler, SchedulerConfig


def _scheduler(block_size: int, num_blocks: int) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=8, max_num_batched_tokens=64, max_model_len=96, token_buckets=(16, 32, 64)
        ),
        CacheConfig(block_size=block_size, num_blocks=num_blocks),
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    block_size=st.sampled_from([2, 4, 16]),
    num_blocks=st.integers(60, 200),
)
def test_decode_inputs_equal_rebuilt_inputs(seed: int, block_size: int, num_blocks: int):
    rng = random.Random(seed)
    s = _scheduler(block_size, num_blocks)
    persistent = DecodeInputs(block_size)
    decode_steps = 0
    for step in range(120):
        if rng.random() < 0.15:
            s.add_request(
                Request(
                    f"r{step}",
                    [rng.randrange(1, 50) for _ in range(rng.randrange(1, 30))],
                    max_tokens=rng.randrange(1, 60),
                    eos_token_id=0,
                )
            )
        out = s.schedule()
        if not out.requests:
            continue
        got = persistent.build(out)
        if got is not None:
            decode_steps += 1
            want = build_step_inputs(chunks_from_output(out), block_size)
            for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens"):
                assert torch.equal(getattr(got, name), getattr(want, name)), name
            assert torch.equal(got.query_start_loc, want.query_start_loc)
            assert torch.equal(got.logits_indices, want.logits_indices)
        else:
            assert out.num_decodes < len(out.requests) or out.num_decodes == 0
        if rng.random() < 0.03 and s.running:  # an abort between steps
            s.abort(rng.choice(s.running).request_id)
        tokens = [rng.randrange(0, 50) if out.samples(i) else None for i in range(len(out))]
        s.update(out, tokens)
        s.block_manager.check_integrity()
    assert decode_steps > 0 or not s.has_unfinished()


def test_decode_only_steps_use_persistent_inputs():
    s = _scheduler(4, 64)
    for i in range(3):
        s.add_request(Request(f"r{i}", [5, 6, 7], max_tokens=20))
    persistent = DecodeInputs(4)
    built = []
    for _ in range(10):
        out = s.schedule()
        built.append(persistent.build(out) is not None)
        s.update(out, [9] * len(out))
    assert built[0] is False and all(built[1:])  # the first step prefills; every later one decodes

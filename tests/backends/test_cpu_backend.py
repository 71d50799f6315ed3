import copy

import pytest
import torch

from neuronserve.backends import available_backends, get_backend
from neuronserve.backends.cpu_layout import TransposedLinear, use_transposed_linears
from neuronserve.backends.inputs import SeqChunk, build_step_inputs, eager_attention_plan
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.core import Request, Scheduler
from tests.model.conftest import BLOCK_SIZE, make_pair


def test_registry_lists_backends_and_names_unknown_ones():
    assert "cpu" in available_backends()
    with pytest.raises(ValueError, match="^backend: unknown backend 'tpu'; available: .*cpu"):
        get_backend("tpu")


def test_eager_plan_gives_the_same_logits_as_the_static_path():
    _, model = make_pair("gqa-9-3-llama3")
    chunks = [
        SeqChunk([7], 9, [1, 2, 3]),  # decodes first, as the scheduler orders them
        SeqChunk([8], 4, [4, 5]),
        SeqChunk(list(range(20, 31)), 0, [6, 7, 8]),  # a whole prefill
        SeqChunk([40, 41, 42], 5, [9, 10]),  # a later chunk of a prefill
    ]
    kv = torch.rand(model.kv_cache_shape(16, BLOCK_SIZE))  # earlier context: arbitrary K/V
    inputs = build_step_inputs(chunks, BLOCK_SIZE)
    plan = eager_attention_plan(chunks, BLOCK_SIZE)
    assert plan.num_decode_tokens == 2 and [s[:3] for s in plan.prefill_segments] == [
        (2, 13, 11),
        (13, 16, 8),
    ]
    with torch.inference_mode():
        static, kv_static = model(*inputs.as_args(), kv.clone())
        planned, kv_planned = model(*inputs.as_args(), kv.clone(), plan=plan)
    torch.testing.assert_close(planned, static, atol=1e-5, rtol=0)
    torch.testing.assert_close(kv_planned, kv_static, atol=1e-5, rtol=0)


def test_transposed_layout_keeps_the_logits():
    _, model = make_pair("mha-5-tied")
    swapped = use_transposed_linears(copy.deepcopy(model))
    assert isinstance(swapped.lm_head, TransposedLinear)
    assert isinstance(swapped.layers[0].mlp.gate_up_proj, TransposedLinear)
    assert isinstance(swapped.layers[0].mlp.down_proj, torch.nn.Linear)  # measured faster as is
    inputs = build_step_inputs([SeqChunk([1, 2, 3, 4, 5], 0, [1, 2])], BLOCK_SIZE)
    kv = torch.zeros(model.kv_cache_shape(4, BLOCK_SIZE))
    with torch.inference_mode():
        a, _ = model(*inputs.as_args(), kv.clone())
        b, _ = swapped(*inputs.as_args(), kv.clone())
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def generate_greedy(model, config, prompts, *, arrive_at, num_blocks=64, max_tokens=6, max_num_seqs=8):
    sched_cfg = SchedulerConfig(
        max_model_len=64, token_buckets=(8, 16, 32), max_num_batched_tokens=32, max_num_seqs=max_num_seqs
    )
    cache_cfg = CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks)
    scheduler = Scheduler(sched_cfg, cache_cfg)
    runner = get_backend("cpu").build_runner(model, config, cache_cfg, sched_cfg)
    outputs, step = {}, 0
    while len(outputs) < len(prompts):
        for i, p in enumerate(prompts):
            if arrive_at[i] == step:
                scheduler.add_request(Request(str(i), p, max_tokens=max_tokens))
        out = scheduler.schedule()
        logits = runner.execute(out)
        for r in scheduler.update(out, logits.argmax(-1).tolist()):
            outputs[int(r.request_id)] = r.output_token_ids
        scheduler.block_manager.check_integrity()
        step += 1
    return [outputs[i] for i in range(len(prompts))], scheduler.stats()


def test_continuous_batching_gives_each_request_its_solo_tokens():
    _, model = make_pair("gqa-9-3-llama3")
    config = model.config
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 211, (n,), generator=gen).tolist() for n in (3, 17, 9, 30, 5, 12)]
    solo = [generate_greedy(model, config, [p], arrive_at=[0])[0][0] for p in prompts]
    batched, _ = generate_greedy(model, config, prompts, arrive_at=[0, 0, 1, 2, 4, 4], max_num_seqs=4)
    assert batched == solo
    # A pool small enough to preempt: recompute must give the same tokens.
    tight, stats = generate_greedy(model, config, prompts, arrive_at=[0] * 6, num_blocks=17, max_num_seqs=6)
    assert stats.num_preemptions > 0 and tight == solo

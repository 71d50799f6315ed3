"""The native decoder stack (kernels/decoder.cpp, neuronserve/ops/layers.py) against the per-op
path it replaces: the same model, the same scheduler drive, step by step."""

import copy

import pytest
import torch

from neuronserve import ops
from neuronserve.backends import get_backend
from neuronserve.config import CacheConfig, ModelConfig, SchedulerConfig
from neuronserve.core import Request, Scheduler
from neuronserve.model.llama import LlamaForCausalLM
from neuronserve.ops.dispatch import forced_isa
from neuronserve.ops.layers import NativeDecoderStack
from neuronserve.quant import quantize_model

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="native kernels not built")

ORDER = ("scalar", "avx2", "avx512", "avx512_vnni")
ISAS = ORDER[: min(ORDER.index(ops.best_isa()), 2) + 1]  # (VNNI: the int8 cases above)


def tiny_model(weights: str | None, bias: bool = True, heads=(6, 2), seed: int = 1) -> tuple:
    config = ModelConfig(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=32,
                         attention_bias=bias)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    if weights:
        quantize_model(model, weights, modules_to_not_convert=[])
    return model, config


def drive(model, config, kv_dtype="auto", per_op=False, budget=48, prompt_len=30):
    """Three requests of different lengths to the end: prefill chunks beside decodes, then decodes.
    Returns every step's logits and the runner."""
    sched_cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=256)
    cache_cfg = CacheConfig(block_size=16, num_blocks=64, cache_dtype=kv_dtype)
    runner = get_backend("cpu").build_runner(model, config, cache_cfg, sched_cfg)
    if per_op:
        runner.model.native_stack = None
    scheduler = Scheduler(sched_cfg, cache_cfg)
    for i in range(3):
        prompt = [(7 * i + j) % 500 + 1 for j in range(prompt_len + 17 * i)]
        scheduler.add_request(Request(str(i), prompt, max_tokens=12, eos_token_id=None))
    steps = []
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        logits = runner.execute(out)
        steps.append(logits.clone())
        scheduler.update(out, logits.argmax(-1).tolist())
    scheduler.block_manager.check_integrity()
    return steps, runner


def assert_same_steps(a, b, tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "weights, kv_dtype",
    [(None, "auto"), ("int8", "int8"), ("int8", "auto"), ("fp8", "fp8"), ("int4", "int8")],
)
def test_the_stack_gives_the_per_op_logits(weights, kv_dtype):
    model, config = tiny_model(weights)
    reference = copy.deepcopy(model)
    steps, runner = drive(model, config, kv_dtype)
    expected, ref_runner = drive(reference, config, kv_dtype, per_op=True)
    assert runner.model.native_stack.calls == len(steps)  # every step, mixed ones included
    assert ref_runner.model.native_stack is None
    # The same kernels; only RMSNorm, RoPE and SiLU-gate are computed by other (fp32) code.
    assert_same_steps(steps, expected, 1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("heads", [(6, 2), (5, 5), (8, 1)], ids=["gqa3", "mha", "mqa"])
def test_each_isa_and_head_layout(isa, heads):
    model, config = tiny_model(None, bias=False, heads=heads)
    reference = copy.deepcopy(model)
    with forced_isa(isa):
        steps, runner = drive(model, config, "int8")
        expected, _ = drive(reference, config, "int8", per_op=True)
    assert runner.model.native_stack.calls == len(steps)
    assert_same_steps(steps, expected, 1e-5)


def test_the_default_cpu_runner_uses_the_stack_and_explains_when_not():
    model, config = tiny_model("int8")
    _, runner = drive(model, config)
    assert runner.native and runner.per_op_reason is None and runner.model.native_stack.calls > 0
    # Tensor parallelism's collectives run in Python between the ops: the per-op path, with a reason.
    linear = runner.model.layers[0].mlp.down_proj
    linear.collective = lambda y: y
    assert "tensor parallelism" in NativeDecoderStack.supports(runner.model)
    # The torch kernels: no stack at all.
    torch_runner = get_backend("cpu").build_runner(
        tiny_model(None)[0], config, CacheConfig(num_blocks=8), SchedulerConfig(), kernels="torch"
    )
    assert torch_runner.model.native_stack is None


def test_the_profiler_sees_the_per_op_path():
    model, config = tiny_model(None)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _, runner = drive(model, config)
    assert runner.model.native_stack.calls == 0
    names = {e.key for e in prof.key_averages()}
    assert "neuronserve::paged_attention" in names and "neuronserve::linear" in names


def test_fp32_steps_beyond_the_native_rows_run_per_op():
    """fp32 layers send more than 256 rows to torch's GEMM, so such a step skips the stack."""
    model, config = tiny_model(None)
    reference = copy.deepcopy(model)
    steps, runner = drive(model, config, budget=300, prompt_len=100)  # a first step of 300 tokens
    stack = runner.model.native_stack
    assert stack.max_tokens == 256 and stack.calls == len(steps) - 1
    expected, _ = drive(reference, config, per_op=True, budget=300, prompt_len=100)
    assert_same_steps(steps, expected, 1e-5)


def test_a_copied_model_has_no_stack_of_the_original():
    model, config = tiny_model(None)
    _, runner = drive(model, config)
    assert copy.deepcopy(runner.model).native_stack is None


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda a: a.update(slot_mapping=torch.tensor([10_000])), "slot_mapping"),
        (lambda a: a.update(block_tables=torch.tensor([[99]])), "block_tables"),
        (lambda a: a.update(context_lens=torch.tensor([40])), "context_lens"),
        (lambda a: a.update(slot_mapping=torch.tensor([3], dtype=torch.int32)), "slot_mapping"),
    ],
    ids=["slot outside the cache", "block outside the cache", "context beyond the table", "int32 slots"],
)
def test_bad_step_input_raises_naming_the_argument(change, name):
    model, config = tiny_model(None)
    _, runner = drive(model, config)
    stack = runner.model.native_stack
    kv_cache = runner.kv_cache
    cos = torch.ones(1, 1, config.head_dim)
    args = {"x": torch.randn(1, config.hidden_size), "cos": cos, "rolled_sin": torch.zeros_like(cos),
            "slot_mapping": torch.tensor([17]), "block_tables": torch.tensor([[1]]),
            "query_start_loc": torch.tensor([0, 1]), "context_lens": torch.tensor([2]),
            "kv_cache": kv_cache}  # fmt: skip
    change(args)
    before = kv_cache.clone()
    with pytest.raises(ValueError, match=f"^{name}:"):
        stack(**args)
    assert torch.equal(kv_cache, before)  # refused before anything was written

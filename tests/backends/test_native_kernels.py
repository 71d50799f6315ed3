"""The CPU backend runs on the native kernels by default, and they give the torch path's logits."""

import copy

import pytest
import torch

from neuronserve import ops
from neuronserve.backends import get_backend
from neuronserve.backends.cpu_layout import TransposedLinear
from neuronserve.backends.inputs import SeqChunk
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.ops import NativeLinear
from tests.model.conftest import TINY_CONFIGS, make_pair

CACHE = CacheConfig(block_size=4, num_blocks=32)
pytestmark = pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)


def _mixed_steps():
    """A prefill, then a step with two decodes and a new sequence's prefill chunk."""
    return [
        [SeqChunk(list(range(3, 14)), 0, [1, 2, 3])],
        [SeqChunk([20], 11, [1, 2, 3]), SeqChunk(list(range(30, 37)), 0, [4, 5]), SeqChunk([5], 0, [6])],
    ]


def _model(name):
    _, model = make_pair(name)
    return model, model.config


def test_the_native_kernels_are_the_default_and_in_use(name):
    model, config = _model(name)
    # CI builds the library through the README's `make test`: a silent fallback to torch fails here.
    assert ops.native_available(), "the native kernel library did not load"
    runner = get_backend("cpu").build_runner(copy.deepcopy(model), config, CACHE, SCHED)
    assert runner.kernels == "native"
    linears = [m for m in runner.model.modules() if isinstance(m, NativeLinear)]
    assert len(linears) == 4 * config.num_hidden_layers + 1  # qkv, o, gate_up, down per layer + LM head
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for chunks in _mixed_steps():
            runner.run_chunks(chunks)
    names = {e.name for e in prof.events()}
    assert {"neuronserve::linear", "neuronserve::paged_attention", "neuronserve::write_kv"} <= names
    assert "aten::scaled_dot_product_attention" not in names


def test_native_kernels_give_transformers_logits(name):
    hf, model = make_pair(name)
    config = model.config
    runner = get_backend("cpu").build_runner(copy.deepcopy(model), config, CACHE, SCHED)
    prompt = list(range(3, 14))
    logits = runner.run_chunks([SeqChunk(prompt, 0, [1, 2, 3])])
    with torch.inference_mode():
        expected = hf(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=1e-4)


def test_native_and_torch_kernels_give_the_same_logits(name):
    model, config = _model(name)
    native = get_backend("cpu").build_runner(copy.deepcopy(model), config, CACHE, SCHED)
    torch_ = get_backend("cpu").build_runner(copy.deepcopy(model), config, CACHE, SCHED, kernels="torch")
    assert torch_.kernels == "torch"
    assert any(isinstance(m, TransposedLinear) for m in torch_.model.modules())
    for chunks in _mixed_steps():
        torch.testing.assert_close(native.run_chunks(chunks), torch_.run_chunks(chunks), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(native.kv_cache, torch_.kv_cache, atol=1e-5, rtol=1e-5)


def test_an_unknown_kernels_choice_is_refused(name):
    model, config = _model(name)
    with pytest.raises(ValueError, match="^kernels: 'fast' is not one of native, torch"):
        get_backend("cpu").build_runner(model, config, CACHE, SCHED, kernels="fast")

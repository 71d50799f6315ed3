"""decode_weight_bytes: what a decode step reads of the weights, on the native kernels (whose layers
hold their tensors as plain attributes, which once made it count 0.1 MB a token) and the torch path."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from neuronserve.backends import get_backend
from neuronserve.bench.weights import decode_weight_bytes
from neuronserve.config import CacheConfig, ModelConfig, SchedulerConfig
from neuronserve.model.llama import LlamaForCausalLM
from neuronserve.quant import quantize_model
from tests.engine.conftest import tiny_config


def tiny_model(tie: bool) -> tuple[LlamaForCausalLM, ModelConfig]:
    config = dataclasses.replace(tiny_config(), tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), config


def runner_model(model, config, kernels: str) -> torch.nn.Module:
    runner = get_backend("cpu").build_runner(
        copy.deepcopy(model),
        config,
        CacheConfig(block_size=4, num_blocks=8),
        SchedulerConfig(),
        kernels=kernels,
    )
    return runner.model


@pytest.mark.parametrize("tie", [True, False])
def test_fp32_counts_every_weight_but_the_embedding(tie):
    model, config = tiny_model(tie)
    params = {p.data_ptr(): p for p in model.parameters()}
    expected = sum(p.numel() * p.element_size() for p in params.values())
    if not tie:  # the embedding is read one row a step; tied, it is the LM head and counts
        expected -= model.embed_tokens.weight.numel() * 4
    assert decode_weight_bytes(model) == expected
    for kernels in ("native", "torch"):
        assert decode_weight_bytes(runner_model(model, config, kernels)) == expected, kernels


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_quantized_counts_what_the_kernels_read(method):
    """A quantized layer's stored weights and scales (int4: and minimums), once; not the other forms
    the torch path keeps for its own kernels (bf16 scales, a repacked int4 copy). On the VNNI path
    an int8 layer's kernel reads its packed copy instead of its rows: the same bytes here, as every
    layer's output count is a multiple of 16."""
    model, config = tiny_model(tie=False)
    quantize_model(model, method)  # the embedding and the LM head stay fp32
    expected = model.lm_head.weight.numel() * 4
    expected += sum(m.weight.numel() * 4 for name, m in model.named_modules() if name.endswith("norm"))
    for m in model.modules():
        if hasattr(m, "qweight"):
            for tensor in (m.qweight, m.scale, getattr(m, "minimum", None)):
                expected += 0 if tensor is None else tensor.numel() * tensor.element_size()
    assert decode_weight_bytes(runner_model(model, config, "native")) == expected

import pytest
import torch
from torch import nn

from neuronserve.quant import FP8Linear, Int4Linear, Int8Linear, quantize_model
from neuronserve.quant.linear import INT8_KERNEL_MAX_ROWS


@pytest.mark.parametrize("cls, tol", [(Int8Linear, 0.02), (FP8Linear, 0.08), (Int4Linear, 0.2)])
def test_each_format_approximates_the_layer_at_any_batch(cls, tol):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    q = cls.from_linear(linear) if cls is not Int4Linear else cls.from_linear(linear, group_size=32)
    for rows in (1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 64):  # packed kernel and GEMM paths
        x = torch.randn(rows, 256)
        with torch.no_grad():
            ref, out = linear(x), q(x)
        assert out.shape == ref.shape and out.dtype == torch.float32
        assert (out - ref).norm() / ref.norm() < tol, rows
    assert (q.dequantize() - linear.weight).abs().max() <= linear.weight.abs().max() * tol


@pytest.mark.parametrize("in_features", [90, 72, 104])
def test_int8_widths_the_packed_kernel_cannot_take_use_the_gemm_path(in_features):
    """The packed kernel crashed or returned garbage on widths not a multiple of 16 (TP shards and
    tiny configs have them)."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 48)
    x = torch.randn(2, in_features)
    with torch.no_grad():
        out, ref = Int8Linear.from_linear(linear)(x), linear(x)
    assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 0.02


def test_storage_sizes():
    linear = nn.Linear(128, 64)
    assert Int8Linear.from_linear(linear).qweight.element_size() == 1
    assert FP8Linear.from_linear(linear).qweight.dtype == torch.float8_e4m3fn
    assert Int4Linear.from_linear(linear, 32).qweight.numel() == 64 * 128 // 2  # two values a byte


def test_quantize_model_swaps_all_but_the_skipped_layers():
    model = nn.Sequential()
    model.add_module("embed_tokens", nn.Embedding(10, 32))
    model.add_module("proj", nn.Linear(32, 32))
    model.add_module("lm_head", nn.Linear(32, 10))
    quantize_model(model, "int8")
    assert isinstance(model.proj, Int8Linear) and isinstance(model.lm_head, nn.Linear)
    with pytest.raises(ValueError, match="^quantization: unknown method 'int3'"):
        quantize_model(model, "int3")

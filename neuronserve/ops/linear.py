"""``x @ W^T`` on the native GEMM/GEMV kernels, for every weight format the quant module makes.

Weights stay in the layout ``nn.Linear`` and ``neuronserve.quant`` keep them ([out, in] rows; int4
two values a byte), so the swap copies nothing. fp32, int8 and fp8 rows are read and widened in
registers, with fp32 activations (exact up to summation order). On AVX-512 VNNI, int8 layers
instead quantize the activations per row in blocks of 32 (one scale each, as llama.cpp's Q8_0) and
multiply in int8: several times the fp32 FLOP rate where a step is compute-bound. They do so at
every row count, so that a row's result never depends on how many rows share its call: a token
decoded alone, with its speculative drafts or in any batch gets the same logits.
fp32 layers with more than ``NATIVE_F32_MAX_ROWS`` rows (prefill) go to torch's GEMM (MKL), which
is faster there; so do int8 / fp8 layers without the VNNI path from ``DEQUANTIZED_MIN_ROWS`` rows,
their weight dequantized for the call (those large steps are the exception to batch invariance).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from neuronserve.ops import _lib
from neuronserve.ops.dispatch import call_directly, effective_isa, native_isa

W_F32, W_I8, W_FP8, W_I4 = 0, 1, 2, 3
WEIGHT_DTYPES = {W_F32: torch.float32, W_I8: torch.int8, W_FP8: torch.float8_e4m3fn, W_I4: torch.uint8}
Q8_BLOCK = 32

# Measured on the 2-core Zen 4 machine on SmolLM2-135M's shapes (benchmarks/cpu_kernels.py): int8
# activations (VNNI) overtake the exact int8 kernel at 4 rows (a tie on the small layers, 1.2x on the
# LM head; 1.2-1.8x at 8 rows); at 1 row, all of SmolLM2's layers from DRAM, they now match it
# (6.3 against 6.4 ms; 9.8 ms before the weight sums and the per-call allocations were dropped);
# the native fp32 kernel beats F.linear (MKL) up to 256 rows (1.1-1.4x at 128-256; 0.8-1.25x at 512).
# On a 2-core AVX2 Zen host (no VNNI), one thread, SmolLM2's gate_up and down layers: int8 and fp8
# weights widened in registers reach 30-37 GFLOP/s at any row count, while dequantizing the whole
# weight once and running torch's fp32 GEMM reaches 35-68 GFLOP/s from 256 rows (1.0-1.8x; slower
# below 128 rows): prefill chunks of int8 / fp8 layers without the VNNI path go that way.
NATIVE_F32_MAX_ROWS = 256
DEQUANTIZED_MIN_ROWS = 256

_lib_def = torch.library.Library("neuronserve", "FRAGMENT")
_lib_def.define(
    "linear(Tensor x, Tensor weight, int wtype, Tensor? scale, Tensor? minimum, int group_size, "
    "Tensor? bias, bool int8_activations=False) -> Tensor"
)


# ------------------------------------------------------------------------------------ references
def dequantize_weight(weight, wtype, scale, minimum, group_size) -> torch.Tensor:
    """The fp32 ``[N, K]`` weight a (quantized) weight stands for."""
    if wtype == W_F32:
        return weight.float()
    if wtype in (W_I8, W_FP8):
        return weight.float() * scale[:, None]
    q = torch.stack([weight & 0xF, weight >> 4], dim=-1).view(weight.shape[0], -1, group_size).float()
    return (q * scale[..., None] + minimum[..., None]).flatten(1)


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """``x [M, K]`` as the VNNI path sees it: rounded to int8 per row in blocks of 32 inputs, one
    scale (max |x| / 127) each."""
    blocks = x.reshape(x.shape[0], -1, Q8_BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, (blocks / scale).round().clamp(-127, 127), torch.zeros_like(blocks))
    return (q * scale).reshape(x.shape)


def linear_reference(x, weight, wtype, scale, minimum, group_size, bias, int8_activations=False):
    """Torch composite of ``linear``: dequantize, then ``F.linear`` (exact fp32 activations; the
    VNNI path's activations differ from these by their int8 rounding, see ``q8_activations``)."""
    return F.linear(x, dequantize_weight(weight, wtype, scale, minimum, group_size), bias)


# ------------------------------------------------------------------------------------ native impl
def _check_linear(
    x, weight, wtype, scale, minimum, group_size, bias, int8_activations
) -> tuple[int, int, int]:
    if wtype not in WEIGHT_DTYPES:
        raise ValueError(f"wtype: {wtype} is not one of {sorted(WEIGHT_DTYPES)}")
    if wtype == W_I4 and (group_size <= 0 or group_size % 2):
        raise ValueError(f"group_size: {group_size} is not a positive even number (int4 weights)")
    if weight.dtype != WEIGHT_DTYPES[wtype] or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight: expected a contiguous 2-d {WEIGHT_DTYPES[wtype]} tensor")
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous():
        raise ValueError("x: expected a contiguous 2-d float32 tensor")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] * (2 if wtype == W_I4 else 1) != K:
        raise ValueError(f"weight: shape {tuple(weight.shape)} does not match x's {K} inputs")
    if wtype != W_F32:
        groups = K // group_size if wtype == W_I4 else None
        expected = (N, groups) if groups else (N,)
        for name, t in (("scale", scale), ("minimum", minimum if wtype == W_I4 else scale)):
            if t is None or t.dtype != torch.float32 or tuple(t.shape) != expected or not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous float32 tensor of shape {expected}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (N,)):
        raise ValueError(f"bias: expected float32 of shape ({N},)")
    if int8_activations and (wtype != W_I8 or K % Q8_BLOCK):
        raise ValueError(
            f"int8_activations: the VNNI path takes int8 weights with K a multiple of {Q8_BLOCK}"
        )
    return M, K, N


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear_cpu(x, weight, wtype, scale, minimum, group_size, bias, int8_activations=False):
    if _lib.LIB is None:
        return linear_reference(x, weight, wtype, scale, minimum, group_size, bias)
    M, K, N = _check_linear(x, weight, wtype, scale, minimum, group_size, bias, int8_activations)
    y = x.new_empty(M, N)
    status = _lib.LIB.ns_linear(
        x.data_ptr(), y.data_ptr(), M, K, N, weight.data_ptr(), wtype, _ptr(scale), _ptr(minimum),
        group_size, _ptr(bias), int(int8_activations), native_isa(), torch.get_num_threads(),
    )  # fmt: skip
    _lib.check(status)
    return y


_lib_def.impl("linear", _linear_cpu, "CPU")


@torch.library.register_fake("neuronserve::linear")
def _linear_fake(x, weight, wtype, scale, minimum, group_size, bias, int8_activations=False):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x, weight, wtype=W_F32, scale=None, minimum=None, group_size=0, bias=None, int8_activations=False):
    """``x [M, K] @ W^T (+ bias)`` with ``W [N, K]`` in format ``wtype`` (see the module doc);
    ``int8_activations`` (int8 weights, AVX-512 VNNI) quantizes x per row in blocks of 32."""
    if call_directly(x):  # (as paged_attention: torch's dispatcher costs ~7 us a call)
        return _linear_cpu(x, weight, wtype, scale, minimum, group_size, bias, int8_activations)
    return torch.ops.neuronserve.linear(x, weight, wtype, scale, minimum, group_size, bias, int8_activations)


def pack_int8(weight: torch.Tensor) -> torch.Tensor:
    """int8 weights ``[N, K]`` (K a multiple of 32) in the VNNI path's order (kernels/internal.h):
    flat uint8, ``ceil(N / 16) * 16 * K`` bytes. AVX-512 VNNI only."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError("weight: expected a contiguous 2-d int8 tensor")
    N, K = weight.shape
    out = torch.empty(-(-N // 16) * 16 * K, dtype=torch.uint8)
    _lib.check(_lib.LIB.ns_pack_int8(weight.data_ptr(), N, K, out.data_ptr()))
    return out


# ------------------------------------------------------------------------------------ module swap
class NativeLinear(nn.Module):
    """A linear layer (fp32 ``nn.Linear`` or a ``neuronserve.quant`` layer) run on the native
    kernels. It shares the tensors of the layer it replaces (no copy) and keeps its collective.
    An int8 layer on the VNNI path also keeps its weights in that path's order (``packed``, one
    more byte a weight), so that no call repacks them."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        from neuronserve.quant.linear import FP8Linear, Int4Linear, Int8Linear

        self.collective = getattr(layer, "collective", None)
        self.scale = self.minimum = None
        self.int8_activations = False
        self.group_size = 0
        if isinstance(layer, Int8Linear):
            self.wtype, self.weight, self.scale = W_I8, layer.qweight, layer.scale
            # (the ISA the kernels run: a forced lower one, NEURONSERVE_KERNEL_ISA, has no VNNI)
            vnni = _lib.LIB is not None and effective_isa() == "avx512_vnni"
            self.int8_activations = vnni and layer.in_features % Q8_BLOCK == 0
        elif isinstance(layer, FP8Linear):
            self.wtype, self.weight, self.scale = W_FP8, layer.qweight, layer.scale
        elif isinstance(layer, Int4Linear):
            self.wtype, self.weight = W_I4, layer.qweight
            self.scale, self.minimum, self.group_size = layer.scale, layer.minimum, layer.group_size
        elif isinstance(layer, nn.Linear):
            self.wtype, self.weight = W_F32, layer.weight.detach()
        else:
            raise TypeError(f"layer: cannot run {type(layer).__name__} on the native kernels")
        self.bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        # The weights are checked once here; a step's calls then check only the activations.
        _check_linear(
            torch.empty(1, self.in_features), self.weight, self.wtype, self.scale, self.minimum,
            self.group_size, self.bias, self.int8_activations,
        )  # fmt: skip
        self.packed = pack_int8(self.weight) if self.int8_activations else None

    @property
    def native_weight(self) -> tuple[int, int]:
        """What the C calls take: the weights' address and the int8_activations code (0 off, 1 on,
        2 on with the packed weights)."""
        if self.packed is not None:
            return self.packed.data_ptr(), 2
        return self.weight.data_ptr(), int(self.int8_activations)

    @property
    def native_max_rows(self) -> int:
        """The most rows a call runs on the native kernels (more go to torch's GEMM)."""
        if self.wtype == W_F32:
            return NATIVE_F32_MAX_ROWS
        if self.wtype in (W_I8, W_FP8) and not self.int8_activations:
            return DEQUANTIZED_MIN_ROWS - 1
        return sys.maxsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if rows > self.native_max_rows:  # torch's GEMM; int8 / fp8 dequantized, freed after the call
            dense = self.weight
            if self.wtype != W_F32:
                dense = dequantize_weight(self.weight, self.wtype, self.scale, None, 0)
            y = F.linear(flat, dense, self.bias)
        else:
            flat = flat.contiguous()
            if _lib.LIB is not None and flat.dtype == torch.float32 and call_directly(flat):
                y = self._direct(flat, rows)
            else:
                y = linear(flat, self.weight, self.wtype, self.scale, self.minimum, self.group_size,
                           self.bias, self.int8_activations)  # fmt: skip
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.collective is None else self.collective(y)

    def _direct(self, flat: torch.Tensor, rows: int) -> torch.Tensor:
        """The C call of ``neuronserve::linear`` for this layer's weights (checked at construction)."""
        y = torch.empty(rows, self.out_features)
        weight, int8_activations = self.native_weight
        status = _lib.LIB.ns_linear(
            flat.data_ptr(), y.data_ptr(), rows, self.in_features, self.out_features,
            weight, self.wtype, _ptr(self.scale), _ptr(self.minimum), self.group_size,
            _ptr(self.bias), int8_activations, native_isa(), torch.get_num_threads(),
        )  # fmt: skip
        if status:
            _lib.check(status)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, wtype={self.wtype}"


def use_native_linears(model: nn.Module) -> nn.Module:
    """Swap every linear layer of ``model`` (fp32 or quantized) for a ``NativeLinear``, in place."""
    from neuronserve.quant.linear import QuantizedLinear

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (nn.Linear, QuantizedLinear)):
                setattr(module, name, NativeLinear(child))
    return model

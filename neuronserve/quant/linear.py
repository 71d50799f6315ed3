"""Weight-only quantized linear layers, each a drop-in for ``nn.Linear`` (a module swap).

- ``Int8Linear``: int8 per output channel, symmetric (scale = max |w| / 127).
- ``FP8Linear``: float8 e4m3 per output channel (scale = max |w| / 448), stored as
  ``torch.float8_e4m3fn`` as Neuron stores it; computed here by dequantizing.
- ``Int4Linear``: 4-bit asymmetric, one scale and zero point per group of ``group_size`` inputs.

The kernel is picked per call from the number of rows, because what is fast depends on it (measured
on the 2-core AVX2 machine): ``_weight_int8pack_mm`` with bf16 activations reads the weights at about
twice fp32's speed for a few rows (decode) but falls behind fp32 GEMM by 32 rows, and is 8x slower
with fp32 activations; so small batches use the packed kernel and larger ones dequantize once and
run fp32 GEMM. int4 uses ``_weight_int4pack_mm_for_cpu`` the same way (it only breaks even with
fp32 here); fp8 has no CPU kernel and is dequantized on every call: int4 and fp8 are about bytes
stored (and, for fp8, Neuron fidelity), not CPU speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# At most this many rows go through the packed int8 kernel; more dequantize and use fp32 GEMM.
INT8_KERNEL_MAX_ROWS = 16
# The int8 kernel reads inputs 16 at a time with no tail: other widths crashed or returned
# garbage (measured on torch 2.13 CPU, e.g. 90 and 100: segfault; 72 and 104: NaN / 1e24).
INT8_KERNEL_IN_MULTIPLE = 16
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


def _packed_kernel(x: torch.Tensor, rows: int) -> bool:
    """Use torch's packed CPU kernels: few rows, on CPU (on other devices — XLA, Neuron — the
    dequantize-and-matmul form is what lowers to the compiler)."""
    return rows <= INT8_KERNEL_MAX_ROWS and x.device.type == "cpu"


class QuantizedLinear(nn.Module):
    """Shared plumbing: the bias, the shape of the layer it replaces and, under tensor
    parallelism, that layer's ``collective`` (``neuronserve.parallel.layers.carry_collective``)."""

    method = ""
    collective = None

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``[out, in]`` this layer stands for."""
        raise NotImplementedError

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        y = y if self.bias is None else y + self.bias
        return y if self.collective is None else self.collective(y)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}"


class Int8Linear(QuantizedLinear):
    method = "int8"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        # The kernel wants bf16 scales: converted once, whenever the scales change (a buffer, not
        # a cache filled on first use, so that a traced graph is the same on every trace).
        self.register_buffer("scale_bf16", torch.ones(out_features, dtype=torch.bfloat16), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())

    @torch.no_grad()
    def refresh(self) -> None:
        self.scale_bf16.copy_(self.scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        layer = cls(w.shape[1], w.shape[0], linear.bias)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        layer.qweight.copy_((w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        layer.scale.copy_(scale)
        layer.refresh()
        return layer

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if _packed_kernel(x, rows) and self.in_features % INT8_KERNEL_IN_MULTIPLE == 0:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale_bf16)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return self._finish(y)


class FP8Linear(QuantizedLinear):
    method = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("scale", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        w = linear.weight.detach().float()
        layer = cls(w.shape[1], w.shape[0], linear.bias)
        scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
        layer.qweight.copy_((w / scale[:, None]).to(torch.float8_e4m3fn))
        layer.scale.copy_(scale)
        return layer

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(F.linear(x, self.dequantize().to(x.dtype)))


class Int4Linear(QuantizedLinear):
    method = "int4"

    def __init__(
        self, in_features: int, out_features: int, bias: torch.Tensor | None = None, group_size: int = 128
    ) -> None:
        super().__init__(in_features, out_features, bias)
        if in_features % group_size or group_size % 2:
            raise ValueError(f"group_size: {in_features} input features are not a multiple of {group_size}")
        self.group_size = group_size
        groups = in_features // group_size
        # Two 4-bit values per byte: input 2j in the low nibble, 2j + 1 in the high one.
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("minimum", torch.zeros(out_features, groups))
        # The same weights in ``_weight_int4pack_mm_for_cpu``'s layout, rebuilt whenever they
        # change (buffers, not a cache filled on first use, so a traced graph is the same on every
        # trace). Its format computes ``(q - 8) * scale + zero``: zero = minimum + 8 * scale.
        self.register_buffer(
            "packed_weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8), persistent=False
        )
        self.register_buffer(
            "scale_zero", torch.zeros(groups, out_features, 2, dtype=torch.bfloat16), persistent=False
        )
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        w = linear.weight.detach().float()
        out_f, in_f = w.shape
        layer = cls(in_f, out_f, linear.bias, group_size)
        grouped = w.view(out_f, in_f // group_size, group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = ((grouped - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        q = q.view(out_f, in_f)
        layer.qweight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        layer.scale.copy_(scale)
        layer.minimum.copy_(low)
        layer.refresh()
        return layer

    def dequantize(self) -> torch.Tensor:
        q = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1)  # (out, in/2, 2)
        q = q.view(self.out_features, -1, self.group_size).float()
        return (q * self.scale[..., None] + self.minimum[..., None]).view(self.out_features, self.in_features)

    @torch.no_grad()
    def refresh(self) -> None:
        q = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1).view(self.out_features, -1)
        self.packed_weight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        zero = self.minimum + 8 * self.scale
        self.scale_zero.copy_(torch.stack([self.scale, zero], dim=-1).transpose(0, 1))  # (groups, out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if _packed_kernel(x, rows):
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat, self.packed_weight, self.group_size, self.scale_zero
            )
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return self._finish(y)


METHODS: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "fp8": FP8Linear, "int4": Int4Linear}

"""The model's decoder layers in one native call per step (``kernels/decoder.cpp``).

At one token a step, a layer's ~25 small torch ops and four library calls cost more than reading
its weights: ~200 us a layer against ~130 us for SmolLM2-135M's int8 weights. ``NativeDecoderStack``
runs the whole stack of ``DecoderLayer``s (RMSNorm, QKV, RoPE, K/V write, paged attention, output
projection, RMSNorm, gate/up, SiLU-gate, down, both residual adds) in C on the same kernels as the
per-op path (``NativeLinear``, ``write_kv``, ``paged_attention``): the step's Python cost is one call.

It is an eager CPU fast path of the same model, like the kernels: the per-op path (``DecoderLayer``
on the ``neuronserve::`` ops) is its reference and is what runs under a tracer, a compiler or the
profiler (so profiles show the individual ops), for steps a layer's kernels do not take natively
(fp32 prefill chunks of more than 256 tokens go to torch's GEMM), and with tensor parallelism (the
collectives run between the ops in Python).
"""

from __future__ import annotations

import ctypes
from ctypes import c_float, c_int32, c_int64, c_void_p

import torch
from torch import nn

from neuronserve.ops import _lib
from neuronserve.ops.attention import _KV_DTYPES
from neuronserve.ops.dispatch import call_directly, native_isa
from neuronserve.ops.linear import NativeLinear, _ptr


class _Linear(ctypes.Structure):
    _fields_ = [
        ("w", c_void_p), ("scale", c_void_p), ("minimum", c_void_p), ("bias", c_void_p),
        ("group_size", c_int64), ("K", c_int64), ("N", c_int64),
        ("wtype", c_int32), ("int8_activations", c_int32),
    ]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", c_void_p), ("post_norm", c_void_p), ("kv_scale", c_void_p),
        ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
    ]  # fmt: skip


class _Step(ctypes.Structure):
    _fields_ = [
        ("x", c_void_p), ("cos", c_void_p), ("rolled_sin", c_void_p), ("slot_mapping", c_void_p),
        ("block_tables", c_void_p), ("query_start_loc", c_void_p), ("context_lens", c_void_p),
        ("cache", c_void_p),
        ("num_tokens", c_int64), ("hidden", c_int64), ("intermediate", c_int64), ("num_heads", c_int64),
        ("kv_heads", c_int64), ("head_dim", c_int64), ("num_seqs", c_int64), ("max_blocks", c_int64),
        ("num_blocks", c_int64), ("block_size", c_int64),
        ("eps", c_float), ("attn_scale", c_float),
        ("kv_dtype", c_int32), ("num_threads", c_int32),
    ]  # fmt: skip


def _linear(layer: NativeLinear) -> _Linear:
    weight, int8_activations = layer.native_weight
    return _Linear(
        weight, _ptr(layer.scale), _ptr(layer.minimum), _ptr(layer.bias), layer.group_size,
        layer.in_features, layer.out_features, layer.wtype, int8_activations,
    )  # fmt: skip


class NativeDecoderStack:
    """Every decoder layer of ``model`` (a ``LlamaForCausalLM`` whose linear layers are
    ``NativeLinear``s without collectives) as one native call; see the module doc.

    The layers' tensors are read by address: like ``NativeLinear``, the stack sees in-place updates
    (KV-cache scale calibration) but not tensors replaced after it was built.
    """

    def __init__(self, model: nn.Module) -> None:
        layers = list(model.layers)
        attn = layers[0].self_attn
        self.num_heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.attn_scale = attn.scale
        self.hidden = model.config.hidden_size
        self.intermediate = layers[0].mlp.down_proj.in_features
        self.eps = layers[0].input_layernorm.eps
        # The most tokens a step may have for every layer to run on the native kernels, as
        # NativeLinear would run it (else the per-op path runs, with torch's GEMM where it is faster).
        linears = [m for layer in layers for m in layer.modules() if isinstance(m, NativeLinear)]
        self.max_tokens = min(m.native_max_rows for m in linears)
        self._tensors = []  # kept alive: the structs hold their addresses
        self._layers = (_Layer * len(layers))()
        for i, layer in enumerate(layers):
            a, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
            self._tensors += [*norms, a.kv_scale]
            self._layers[i] = _Layer(
                norms[0].data_ptr(), norms[1].data_ptr(), a.kv_scale.data_ptr(),
                _linear(a.qkv_proj), _linear(a.o_proj), _linear(mlp.gate_up_proj), _linear(mlp.down_proj),
            )  # fmt: skip
        self.num_layers = len(layers)
        self.calls = 0  # steps run natively (for tests and diagnostics)

    # A copied or pickled model gets no stack (it would point at the original's tensors): it runs
    # per op until its runner builds its own.
    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return type(None), ()

    @staticmethod
    def supports(model: nn.Module) -> str | None:
        """``None`` if ``model``'s layers can run as a stack, else why not."""
        if _lib.LIB is None:
            return "no native library"
        layers = getattr(model, "layers", None)
        if not layers:
            return "no decoder layers"
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            for m in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj):
                if not isinstance(m, NativeLinear):
                    return f"a {type(m).__name__} layer is not on the native kernels"
                if m.collective is not None:
                    return "tensor parallelism (the collectives run in Python between the ops)"
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if norm.weight.dtype != torch.float32 or norm.eps != layers[0].input_layernorm.eps:
                    return "RMSNorm weights not float32 or with different eps"
            if mlp.gate_up_proj.out_features != 2 * mlp.down_proj.in_features:
                return "gate_up is not [gate; up] of the down projection's inputs"
            if a.head_dim % 2:
                return "odd head_dim"
        return None

    def accepts(self, x: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether this step runs here (else on the per-op path): an eager float32 step of at most
        ``max_tokens`` tokens over a contiguous cache."""
        return (
            x.dtype == torch.float32
            and x.shape[0] <= self.max_tokens
            and call_directly(x)
            and kv_cache.dtype in _KV_DTYPES
            and kv_cache.is_contiguous()
        )

    def __call__(
        self, x, cos, rolled_sin, slot_mapping, block_tables, query_start_loc, context_lens, kv_cache
    ) -> torch.Tensor:
        """``x [T, hidden]`` through every layer; returns the new residual stream (a new tensor).
        ``cos`` / ``rolled_sin``: ``[T, 1, head_dim]`` as the model computes them; the rest as the
        model's forward takes them, ``kv_cache`` being every layer's cache."""
        T = x.shape[0]
        x = x.clone(memory_format=torch.contiguous_format)  # (the stack updates it in place)
        cos, rolled_sin = cos.contiguous(), rolled_sin.contiguous()
        B, max_blocks = block_tables.shape
        _, _, num_blocks, kvh, block_size, hd = kv_cache.shape
        for name, t, shape in (
            ("slot_mapping", slot_mapping, (T,)),
            ("block_tables", block_tables, (B, max_blocks)),
            ("query_start_loc", query_start_loc, (B + 1,)),
            ("context_lens", context_lens, (B,)),
        ):
            if t.dtype != torch.int64 or tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous int64 tensor of shape {shape}")
        if (kvh, hd) != (self.kv_heads, self.head_dim) or kv_cache.shape[0] != self.num_layers:
            raise ValueError(f"kv_cache: shape {tuple(kv_cache.shape)} does not match the model")
        step = _Step(
            x.data_ptr(), cos.data_ptr(), rolled_sin.data_ptr(), slot_mapping.data_ptr(),
            block_tables.data_ptr(), query_start_loc.data_ptr(), context_lens.data_ptr(), kv_cache.data_ptr(),
            T, self.hidden, self.intermediate, self.num_heads, kvh, hd, B, max_blocks, num_blocks,
            block_size, self.eps, self.attn_scale, _KV_DTYPES[kv_cache.dtype], torch.get_num_threads(),
        )  # fmt: skip
        _lib.check(
            _lib.LIB.ns_decoder_layers(self._layers, self.num_layers, ctypes.byref(step), native_isa())
        )
        self.calls += 1
        return x


def use_native_decoder(model: nn.Module) -> str | None:
    """Give ``model`` (its linear layers already ``NativeLinear``s) a ``NativeDecoderStack`` that
    its forward uses for eager steps; returns ``None``, or why the model keeps the per-op path."""
    reason = NativeDecoderStack.supports(model)
    model.native_stack = None if reason else NativeDecoderStack(model)
    return reason

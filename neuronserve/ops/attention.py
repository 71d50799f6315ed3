"""Paged attention read in place, and the K/V write that precedes it: ops and torch references.

A layer's cache is ``kv_cache [2, num_blocks, kv_heads, block_size, head_dim]`` (fp32, int8 or
float8 e4m3fn; the quantized ones with per-head scales ``kv_scale [2, kv_heads]``): within a block
each KV head's rows are one contiguous run, the layout of vLLM's CPU value cache and of the Neuron
NKI paged-attention kernels. Slot ``s`` is row ``s % block_size`` of block ``s // block_size``. A step's
sequences are described as the model's forward describes them: sequence ``b`` owns query tokens
``query_start_loc[b]:query_start_loc[b+1]`` and has ``context_lens[b]`` tokens after the step, so
its new tokens are the last ones of its context and each attends causally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neuronserve.ops import _lib
from neuronserve.ops.dispatch import call_directly, native_isa

_KV_DTYPES = {torch.float32: 0, torch.int8: 1, torch.float8_e4m3fn: 2}
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}

_lib_def = torch.library.Library("neuronserve", "DEF")
_lib_def.define(
    "write_kv(Tensor k, Tensor v, Tensor(a!) kv_cache, Tensor slot_mapping, Tensor kv_scale) -> ()"
)
_lib_def.define(
    "paged_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor query_start_loc, "
    "Tensor context_lens, Tensor kv_scale, float scale) -> Tensor"
)


# ------------------------------------------------------------------------------------ references
def _per_head(scale: torch.Tensor, heads_dim: int) -> torch.Tensor:
    """``scale [kvh]`` shaped to broadcast over a tensor whose heads lie at ``heads_dim`` (< 0)."""
    return scale.view(-1, *[1] * (-heads_dim - 1))


def quantize_kv(
    x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, heads_dim: int = -2
) -> torch.Tensor:
    """``x`` in the cache's dtype, divided by its head's ``scale [kvh]`` if quantized. The heads
    are dimension ``heads_dim`` of ``x``: -2 for new tokens ``(T, kvh, hd)``, -3 for cache blocks
    ``(..., kvh, block_size, hd)``."""
    if dtype == torch.int8:
        return (x / _per_head(scale, heads_dim)).round().clamp(-127, 127).to(dtype)
    if dtype == torch.float8_e4m3fn:
        return (x / _per_head(scale, heads_dim)).clamp(-448, 448).to(dtype)
    return x.to(dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor, heads_dim: int = -2) -> torch.Tensor:
    """``x`` as float32, times its head's ``scale [kvh]`` if quantized (heads at ``heads_dim``)."""
    if x.dtype in QMAX:
        return x.float() * _per_head(scale, heads_dim)
    return x.float()


def raw_kv(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as their bytes: index_copy_/index_select have no float8 kernels on CPU."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def cache_rows(slot_mapping: torch.Tensor, kv_heads: int, block_size: int) -> torch.Tensor:
    """``[T * kv_heads]``: the rows of a layer's K (or V) cache seen as ``(-1, head_dim)`` that
    tokens ``t``'s heads are written to, token-major (the order of ``k.reshape(-1, head_dim)``)."""
    # Slots are never negative: truncating division, without floor division's sign fix-ups
    # (which torch-xla lowers to a dozen instructions per layer).
    block = torch.div(slot_mapping, block_size, rounding_mode="trunc")
    offset = slot_mapping - block * block_size
    heads = torch.arange(kv_heads, device=slot_mapping.device)
    return ((block[:, None] * kv_heads + heads) * block_size + offset[:, None]).reshape(-1)


def head_block_rows(index: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[kv_heads * len(index)]``: the rows of blocks ``index`` in a layer's K (or V) cache seen
    as ``(num_blocks * kv_heads, block_size, head_dim)``, head by head (each a contiguous run)."""
    return (index[None, :] * kv_heads + torch.arange(kv_heads, device=index.device)[:, None]).reshape(-1)


def write_kv_reference(k, v, kv_cache, slot_mapping, kv_scale, rows=None) -> None:
    """Torch composite of ``write_kv``: quantize and ``index_copy_`` each head's row into place
    (``rows``: ``cache_rows(slot_mapping)`` when the caller has it)."""
    kvh, block_size, hd = kv_cache.shape[-3:]
    rows = cache_rows(slot_mapping, kvh, block_size) if rows is None else rows
    for which, x in ((0, k), (1, v)):
        flat = kv_cache[which].view(-1, hd)
        new = quantize_kv(x, kv_scale[which], kv_cache.dtype).reshape(-1, hd)
        raw_kv(flat).index_copy_(0, rows, raw_kv(new))


def paged_attention_reference(
    q, kv_cache, block_tables, query_start_loc, context_lens, kv_scale, scale
) -> torch.Tensor:
    """Torch composite of ``paged_attention``: per sequence, gather its blocks, causal SDPA."""
    T, nh, hd = q.shape
    kvh, block_size = kv_cache.shape[2], kv_cache.shape[3]
    out = q.new_zeros(T, nh, hd)
    for b in range(block_tables.shape[0]):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        ctx = int(context_lens[b])
        if end == start:
            continue
        blocks = block_tables[b, : -(-ctx // block_size)]
        # (blocks, kvh, block_size, hd) -> (kvh, ctx, hd)
        keys = raw_kv(kv_cache[0]).index_select(0, blocks).view(kv_cache.dtype).transpose(0, 1)
        values = raw_kv(kv_cache[1]).index_select(0, blocks).view(kv_cache.dtype).transpose(0, 1)
        keys = dequantize_kv(keys.flatten(1, 2)[:, :ctx], kv_scale[0], heads_dim=-3)
        values = dequantize_kv(values.flatten(1, 2)[:, :ctx], kv_scale[1], heads_dim=-3)
        positions = torch.arange(ctx - (end - start), ctx)
        mask = torch.arange(ctx)[None, :] <= positions[:, None]  # (n, ctx)
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),  # (nh, n, hd)
            keys,  # (kvh, ctx, hd)
            values,
            attn_mask=mask,
            scale=scale,
            enable_gqa=nh != kvh,
        )
        out[start:end] = o.transpose(0, 1)
    return out


# ------------------------------------------------------------------------------------ checks
def _check_cache(kv_cache: torch.Tensor, kv_scale: torch.Tensor) -> None:
    if kv_cache.dtype not in _KV_DTYPES:
        raise ValueError(f"kv_cache: dtype {kv_cache.dtype} is not float32, int8 or float8_e4m3fn")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache: shape {tuple(kv_cache.shape)} is not (2, blocks, kv_heads, block_size, hd)"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache: must be contiguous")
    if kv_scale.dtype != torch.float32 or tuple(kv_scale.shape) != (2, kv_cache.shape[2]):
        raise ValueError(f"kv_scale: expected float32 of shape (2, {kv_cache.shape[2]})")
    if not kv_scale.is_contiguous():
        raise ValueError("kv_scale: must be contiguous")


def _check(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def _cache_args(kv_cache: torch.Tensor, kv_scale: torch.Tensor) -> tuple:
    _, num_blocks, kvh, block_size, hd = kv_cache.shape
    dtype = _KV_DTYPES[kv_cache.dtype]
    return kv_cache.data_ptr(), dtype, num_blocks, block_size, kvh, hd, kv_scale.data_ptr()


# ------------------------------------------------------------------------------------ native impls
def _write_kv_cpu(k, v, kv_cache, slot_mapping, kv_scale) -> None:
    if _lib.LIB is None:
        return write_kv_reference(k, v, kv_cache, slot_mapping, kv_scale)
    _check_cache(kv_cache, kv_scale)
    kvh, hd = kv_cache.shape[2], kv_cache.shape[4]
    T = slot_mapping.shape[0]
    _check("slot_mapping", slot_mapping, torch.int64, (T,))
    _check("k", k, torch.float32, (T, kvh, hd))
    _check("v", v, torch.float32, (T, kvh, hd))
    status = _lib.LIB.ns_write_kv(
        k.data_ptr(), v.data_ptr(), T, slot_mapping.data_ptr(), *_cache_args(kv_cache, kv_scale),
        native_isa(), torch.get_num_threads(),
    )  # fmt: skip
    _lib.check(status)


def _paged_attention_cpu(q, kv_cache, block_tables, query_start_loc, context_lens, kv_scale, scale):
    if _lib.LIB is None:
        return paged_attention_reference(
            q, kv_cache, block_tables, query_start_loc, context_lens, kv_scale, scale
        )
    _check_cache(kv_cache, kv_scale)
    if q.dim() != 3 or q.shape[2] != kv_cache.shape[4]:
        raise ValueError(f"q: shape {tuple(q.shape)} is not (tokens, heads, {kv_cache.shape[4]})")
    _check("q", q, torch.float32, q.shape)
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables: shape {tuple(block_tables.shape)} is not (sequences, max_blocks)")
    B, max_blocks = block_tables.shape
    _check("block_tables", block_tables, torch.int64, (B, max_blocks))
    _check("query_start_loc", query_start_loc, torch.int64, (B + 1,))
    _check("context_lens", context_lens, torch.int64, (B,))
    T, nh, _ = q.shape
    out = torch.empty_like(q)
    status = _lib.LIB.ns_paged_attention(
        q.data_ptr(), out.data_ptr(), T, nh, block_tables.data_ptr(), B, max_blocks,
        query_start_loc.data_ptr(), context_lens.data_ptr(), scale, *_cache_args(kv_cache, kv_scale),
        native_isa(), torch.get_num_threads(),
    )  # fmt: skip
    _lib.check(status)
    return out


_lib_def.impl("write_kv", _write_kv_cpu, "CPU")
_lib_def.impl("paged_attention", _paged_attention_cpu, "CPU")


@torch.library.register_fake("neuronserve::write_kv")
def _write_kv_fake(k, v, kv_cache, slot_mapping, kv_scale) -> None:
    return None


@torch.library.register_fake("neuronserve::paged_attention")
def _paged_attention_fake(q, kv_cache, block_tables, query_start_loc, context_lens, kv_scale, scale):
    return torch.empty_like(q)


def write_kv(k, v, kv_cache, slot_mapping, kv_scale) -> None:
    """Write ``k``/``v [T, kv_heads, head_dim]`` (fp32) into ``kv_cache``'s ``slot_mapping [T]``
    slots, quantized with ``kv_scale`` for an int8 / fp8 cache."""
    if call_directly(k):
        _write_kv_cpu(k, v, kv_cache, slot_mapping, kv_scale)
    else:
        torch.ops.neuronserve.write_kv(k, v, kv_cache, slot_mapping, kv_scale)


def paged_attention(
    q, kv_cache, block_tables, query_start_loc, context_lens, kv_scale, scale
) -> torch.Tensor:
    """Attention of ``q [T, heads, head_dim]`` (fp32) over each sequence's cached context, read in
    place through ``block_tables [B, max_blocks]``; returns ``[T, heads, head_dim]``."""
    if call_directly(q):
        return _paged_attention_cpu(q, kv_cache, block_tables, query_start_loc, context_lens, kv_scale, scale)
    return torch.ops.neuronserve.paged_attention(
        q, kv_cache, block_tables, query_start_loc, context_lens, kv_scale, scale
    )

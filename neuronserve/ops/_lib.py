"""Loading the native kernel library (``neuronserve/ops/_kernels*.so``, built by CMake at install).

The library is a plain C ABI called through ``ctypes``; it is imported as an (empty) extension
module only so that the import system finds it wherever the install put it. Set
``NEURONSERVE_KERNELS_LIB`` to a built ``.so`` to use that one instead (kernel development), or
``NEURONSERVE_KERNELS=torch`` to never load it.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from ctypes import c_float, c_int, c_int64, c_void_p

import torch  # noqa: F401  (first: its libgomp.so.1 is the OpenMP runtime the kernels then share)

ISA_NAMES = ("scalar", "avx2", "avx512", "avx512_vnni")

_SIGNATURES = {
    "ns_last_error": ([], ctypes.c_char_p),
    "ns_best_isa": ([], c_int),
    # k, v, num_tokens, slot_mapping, cache, kv_dtype, num_blocks, block_size, kvh, hd, kv_scale, isa, threads
    "ns_write_kv": (
        [c_void_p, c_void_p, c_int64, c_void_p, c_void_p, c_int, c_int64, c_int64, c_int64, c_int64]
        + [c_void_p, c_int, c_int],
        c_int,
    ),
    # q, out, num_tokens, num_heads, block_tables, num_seqs, max_blocks, query_start_loc, context_lens,
    # scale, cache, kv_dtype, num_blocks, block_size, kvh, hd, kv_scale, isa, threads
    "ns_paged_attention": (
        [c_void_p, c_void_p, c_int64, c_int64, c_void_p, c_int64, c_int64, c_void_p, c_void_p, c_float]
        + [c_void_p, c_int, c_int64, c_int64, c_int64, c_int64, c_void_p, c_int, c_int],
        c_int,
    ),
    # x, y, M, K, N, w, wtype, scale, minimum, group_size, bias, int8_activations, isa, threads
    "ns_linear": (
        [c_void_p, c_void_p, c_int64, c_int64, c_int64, c_void_p, c_int, c_void_p, c_void_p, c_int64]
        + [c_void_p, c_int, c_int, c_int],
        c_int,
    ),
    # w (int8 [N, K]), N, K, out (uint8, ceil(N / 16) * 16 * K)
    "ns_pack_int8": ([c_void_p, c_int64, c_int64, c_void_p], c_int),
    # layers (DecoderLayer[num_layers]), num_layers, step (DecoderStep*), isa
    "ns_decoder_layers": ([c_void_p, c_int64, c_void_p, c_int], c_int),
}


def _find_library() -> str:
    override = os.environ.get("NEURONSERVE_KERNELS_LIB")
    if override:
        return override
    from neuronserve.ops import _kernels  # the extension module CMake installed

    return _kernels.__file__


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("NEURONSERVE_KERNELS", "").lower() == "torch":
        return None, "NEURONSERVE_KERNELS=torch"
    try:
        lib = ctypes.CDLL(_find_library())
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
    except (ImportError, OSError, AttributeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return lib, ""


LIB, LOAD_ERROR = _load()
_warned = False


def native_available() -> bool:
    """Whether the native kernels are built and loaded (warns once, with the reason, if not)."""
    global _warned
    if LIB is None and not _warned and not LOAD_ERROR.startswith("NEURONSERVE_KERNELS"):
        _warned = True
        warnings.warn(
            f"neuronserve: native CPU kernels are not available ({LOAD_ERROR}); using the torch "
            "implementations (slower). Reinstall with a C++17 compiler to build them.",
            RuntimeWarning,
            stacklevel=3,
        )
    return LIB is not None


def check(status: int) -> None:
    """Raise the library's error (a ``ValueError`` naming the argument) for a non-zero status."""
    if status:
        raise ValueError(LIB.ns_last_error().decode())


def best_isa() -> str:
    """The best instruction set this CPU offers the kernels (``scalar`` without the library)."""
    return ISA_NAMES[LIB.ns_best_isa()] if LIB is not None else "scalar"

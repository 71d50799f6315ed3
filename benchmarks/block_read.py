"""The blocks of a paged K/V cache that a decode attention call reads, read in the kernel's order
with no arithmetic (native/block_read.cpp): the ceiling that this machine's memory sets for the
kernel's access pattern, reported beside the kernel's cold figures by cpu_kernels.py.

The source is compiled here with the system's C++ compiler (for this CPU, with OpenMP) into
~/.cache/neuronserve/bench, once per version of the source; where that cannot be done, `load`
says why and the benchmark reports no ceiling.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).parent / "native" / "block_read.cpp"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuronserve" / "bench"


class BlockReader:
    """``read(cache, tables, context_lens, chunk_keys, work=0)``: the rows of every head's K and V
    for each sequence's first ``context_lens[b]`` keys, in the attention kernel's order; returns the
    XOR of the 8-byte words read (see ``expected_xor``). ``work``: multiply-adds done on each
    64-byte line after it is read, a stand-in for a kernel's arithmetic (the result is the same)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        fn = library.ns_read_blocks
        fn.restype = ctypes.c_uint64
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 7 + [ctypes.c_int, ctypes.c_int64]
        self._fn = fn

    def read(
        self,
        cache: torch.Tensor,
        tables: torch.Tensor,
        context_lens: torch.Tensor,
        chunk_keys: int,
        work: int = 0,
    ) -> int:
        if cache.dim() != 5 or cache.shape[0] != 2 or not cache.is_contiguous():
            shape = tuple(cache.shape)
            raise ValueError(
                f"cache: expected a contiguous [2, blocks, kv_heads, block, head_dim], got {shape}"
            )
        if tables.dtype != torch.int64 or context_lens.dtype != torch.int64:
            raise ValueError("tables and context_lens must be int64")
        tables, context_lens = tables.contiguous(), context_lens.contiguous()
        _, blocks, kv_heads, block, head_dim = cache.shape
        if int(context_lens.max()) > tables.shape[1] * block:
            raise ValueError("context_lens: a sequence has more keys than its table has blocks")
        if int(tables.min()) < 0 or int(tables.max()) >= blocks:
            raise ValueError(f"tables: block index out of range [0, {blocks})")
        if work < 0:
            raise ValueError(f"work: expected >= 0 multiply-adds a line, got {work}")
        head_bytes = head_dim * cache.element_size()
        if head_bytes % 8:
            raise ValueError(f"head_dim: a row of {head_bytes} bytes is not whole 8-byte words")
        return self._fn(
            cache.data_ptr(), tables.data_ptr(), context_lens.data_ptr(), tables.shape[0], tables.shape[1],
            kv_heads, block, head_bytes, cache[0].numel() * cache.element_size(), chunk_keys,
            torch.get_num_threads(), work,
        )  # fmt: skip


def load() -> BlockReader | str:
    """The compiled reader, or the reason there is none."""
    source = SOURCE.read_bytes()
    target = CACHE / f"block_read-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not target.exists():
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if compiler is None:
            return "no C++ compiler found (set CXX)"
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler, "-O2", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}"
        tmp.replace(target)
    return BlockReader(ctypes.CDLL(str(target)))


def expected_xor(cache: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor) -> int:
    """What ``BlockReader.read`` must return: the XOR of the 8-byte words of each sequence's K and
    V rows (its first context_lens[b] keys, every head)."""
    words = cache.contiguous().view(torch.uint8).view(*cache.shape[:4], -1).view(torch.int64)
    total = 0
    for b in range(tables.shape[0]):
        n = int(context_lens[b])
        rows = (
            words[:, tables[b]]
            .permute(0, 2, 1, 3, 4)
            .reshape(2, cache.shape[2], -1, words.shape[-1])[:, :, :n]  # [2, kv_heads, keys, words]
        )
        total ^= int(np.bitwise_xor.reduce(rows.reshape(-1).numpy()))
    return total & (2**64 - 1)


WORK_LEVELS = (8, 16, 24, 32, 48)  # multiply-adds a 64-byte line in cpu_kernels.py's overlap sweep


def warm_at_fraction(curve: list[dict], target: float) -> float | None:
    """The warm ms at which the sweep's cold fraction crosses ``target``, interpolated between the
    two levels around it; None where it does not cross."""
    for a, b in zip(curve, curve[1:]):
        if a["cold_fraction"] >= target >= b["cold_fraction"] and a["cold_fraction"] > b["cold_fraction"]:
            t = (a["cold_fraction"] - target) / (a["cold_fraction"] - b["cold_fraction"])
            return round(a["warm_ms"] + t * (b["warm_ms"] - a["warm_ms"]), 3)
    return None

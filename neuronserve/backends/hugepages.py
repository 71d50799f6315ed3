"""Host tensors backed by 2 MB pages where Linux allows it (transparent huge pages).

Paged attention reads each KV head's rows of a block as one run of a few KB, from blocks scattered
over the whole cache: with 4 KB pages nearly every run is a TLB miss and a page walk. Asking the
kernel for huge pages (``madvise(MADV_HUGEPAGE)`` before the memory is first touched) measured
cold fp32 decode attention at 32 sequences x 512 tokens ~18% faster on this project's 2-core
AVX-512 host (median of interleaved runs; ``benchmarks/cpu_kernels.py`` reports the cache's pages).

It is a hint: where transparent huge pages are off (``/sys/kernel/mm/transparent_hugepage/enabled``
set to ``never``), on other systems, or without libc, the tensor is an ordinary one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux, every architecture


@cache
def _madvise():
    """libc's madvise, or None where there is none to call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def transparent_huge_pages() -> str:
    """The system's setting: ``always``, ``madvise``, ``never``, or ``unknown``."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "unknown"


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype)``, its memory 2 MB aligned and advised into huge pages
    when it spans at least one (a contiguous view into a slightly larger buffer)."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    madvise = _madvise()
    if madvise is None or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype)
    buffer = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # untouched: no pages yet
    offset = -buffer.data_ptr() % HUGE_PAGE
    madvise(buffer.data_ptr() + offset, nbytes, _MADV_HUGEPAGE)  # a hint: failure changes nothing
    tensor = buffer[offset : offset + nbytes].view(dtype).view(shape)
    return tensor.zero_()  # the first touch, now in huge pages where the system grants them

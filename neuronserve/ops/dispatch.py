"""Which instruction set the native kernels run (the best one this CPU has, unless forced)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from neuronserve.ops._lib import ISA_NAMES, best_isa

# LLM(kernels=...) / --kernels: the native kernels (default) or the torch paths, for comparison.
KERNEL_CHOICES = ("native", "torch")

_forced = os.environ.get("NEURONSERVE_KERNEL_ISA", "")


def native_isa() -> int:
    """The ISA code passed to the library: -1 for the best available, else the forced one."""
    return ISA_NAMES.index(_forced) if _forced else -1


def effective_isa() -> str:
    """The instruction set the kernels run now: the forced one, else the best this CPU has."""
    return _forced or best_isa()


@contextmanager
def forced_isa(name: str) -> Iterator[None]:
    """Run the kernels with at most ``name``'s instructions (``scalar``, ``avx2``, ``avx512``,
    ``avx512_vnni``) inside the block: how the tests cover every path on one machine."""
    global _forced
    if name not in ISA_NAMES:
        raise ValueError(f"isa: {name!r} is not one of {', '.join(ISA_NAMES)}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def call_directly(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` may skip torch's dispatcher and call its CPU implementation (and the
    C library) directly: a plain eager CPU tensor, with no tracer, compiler or profiler watching.
    The dispatcher costs several microseconds a call, a millisecond over a decode step's ~180 ops;
    whatever traces or profiles the model still sees the ``neuronserve::`` ops."""
    return (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.autograd._profiler_enabled()
    )

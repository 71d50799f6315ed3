"""The backend contract: a ``Backend`` builds a ``ModelRunner``; a registry maps names to classes.

Nothing above ``backends/`` knows which backend is in use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from neuronserve.config import CacheConfig, CompileConfig, ModelConfig, SchedulerConfig
from neuronserve.core import SchedulerOutput


def kv_cache_torch_dtype(cache_config: CacheConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: ``auto`` follows the weights; ``int8``/``fp8`` are one byte."""
    return {"auto": model_dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[cache_config.cache_dtype]


class RunnerDeadError(RuntimeError):
    """The runner cannot run another step (a tensor-parallel worker died, for one); the engine
    must be rebuilt. Unlike a step's ordinary failure, it ends every request."""


class ModelRunner(ABC):
    """Runs one scheduled step on a device and returns the logits of each scheduled sequence."""

    model_config: ModelConfig

    @abstractmethod
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits (float32) ``[sum of out.num_logits(i), vocab]``: for each request in batch order,
        its last new token's row, or with drafts (``out.spec_token_ids``) the rows of its next token
        and each draft. Without drafts that is ``[len(out), vocab]``, row ``i`` for request ``i``."""

    def shutdown(self) -> None:  # noqa: B027 (optional: most runners hold nothing to release)
        """Release processes and devices the runner holds (nothing, for an in-process runner)."""


class ChunkModelRunner(ModelRunner):
    """A runner that executes a step from its chunks (token ids, start, block table per sequence)
    — what tensor-parallel workers receive instead of the scheduler's output."""

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        from neuronserve.backends.inputs import chunks_from_output

        return self.run_chunks(chunks_from_output(out))

    @abstractmethod
    def run_chunks(self, chunks: list) -> torch.Tensor:
        """Logits ``[sum of num_logits, vocab]`` of the step of ``chunks`` (``SeqChunk``s)."""


class Backend(ABC):
    name: str = ""
    # True for a backend that shards the model over devices itself (neuron, with
    # neuronx_distributed); otherwise tensor parallelism runs one process per rank.
    shards_itself: bool = False
    # True for a backend whose build_runner takes ``kernels`` ("native" | "torch": the C++ kernels
    # of neuronserve.ops or torch's ops); the static-graph backends trace the torch composites.
    uses_kernels: bool = False

    @abstractmethod
    def build_runner(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        compile_config: CompileConfig | None = None,
    ) -> ModelRunner:
        """Build a runner for a model whose weights are loaded (``compile_config``: for the
        static-graph backends; others ignore it)."""


_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(name: str):
    def decorator(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend: unknown backend {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def available_backends() -> list[str]:
    return sorted(_REGISTRY)

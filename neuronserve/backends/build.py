"""Building a runner from a model spec: load (this rank's shard of) the weights, quantize,
calibrate the KV cache, hand the model to the backend. Every tensor-parallel rank runs the same
function with the same spec, so they build matching shards (and meet at the same collectives)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuronserve.backends.base import ModelRunner, get_backend, kv_cache_torch_dtype
from neuronserve.config import CacheConfig, ModelConfig, SchedulerConfig
from neuronserve.parallel.group import SINGLE, TPGroup


@dataclass
class ModelSpec:
    """What to build, in picklable form (worker processes receive it). ``kv_cache_gb``, when set,
    sizes the KV cache (per rank) instead of ``cache_config.num_blocks``."""

    model: str
    backend: str = "cpu"
    dtype: str = "float32"
    quantization: str | None = None
    modules_to_not_convert: Sequence[str] | None = None
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    kv_cache_gb: float | None = None
    tensor_parallel_size: int = 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class BuiltRank:
    runner: ModelRunner
    model_config: ModelConfig
    cache_config: CacheConfig  # with the block count the runner allocated
    model_dir: Path


def build_rank(spec: ModelSpec, group: TPGroup = SINGLE) -> BuiltRank:
    """Build ``group.rank``'s runner for ``spec``."""
    from neuronserve.engine.engine import blocks_for_memory  # sizing rule shared with the engine
    from neuronserve.model.loader import load_model

    backend = get_backend(spec.backend)  # unknown names fail before the model loads
    module, config, hf_dir = load_model(spec.model, dtype=spec.torch_dtype, tp_group=group)
    stored = getattr(module, "quantization", None)
    if spec.quantization is not None and stored is not None:
        raise ValueError(f"quantization: {spec.model} is already quantized ({stored['method']})")
    if spec.quantization is not None:
        from neuronserve.quant import quantize_model

        quantize_model(module, spec.quantization, spec.modules_to_not_convert)
    cache_config = spec.cache_config
    kv_dtype = kv_cache_torch_dtype(cache_config, spec.torch_dtype)
    if cache_config.cache_dtype != "auto":
        from neuronserve.model.tokenizer import Tokenizer
        from neuronserve.quant.kv import CALIBRATION_TEXT, calibrate_kv_scales

        # Every rank runs the same calibration prefill (its collectives meet the others').
        calibrate_kv_scales(module, Tokenizer.from_dir(hf_dir).encode(CALIBRATION_TEXT), kv_dtype)
    if spec.kv_cache_gb is not None:
        num_blocks = blocks_for_memory(
            config,
            spec.scheduler_config,
            cache_config.block_size,
            spec.kv_cache_gb,
            kv_dtype.itemsize,
            kv_heads=module.head_layout.kv_per_rank,
        )
        cache_config = dataclasses.replace(cache_config, num_blocks=num_blocks)
    runner = backend.build_runner(module, config, cache_config, spec.scheduler_config)
    return BuiltRank(runner, config, cache_config, hf_dir)

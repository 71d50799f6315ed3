"""Building a runner from a model spec: load (this rank's shard of) the weights, quantize,
calibrate the KV cache, hand the model to the backend. Every tensor-parallel rank runs the same
function with the same spec, so they build matching shards (and meet at the same collectives)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuronserve.backends.base import ModelRunner, get_backend, kv_cache_torch_dtype
from neuronserve.config import CacheConfig, CompileConfig, ModelConfig, SchedulerConfig
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
    compile_config: CompileConfig | None = None
    kernels: str = "native"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class BuiltRank:
    runner: ModelRunner
    model_config: ModelConfig
    cache_config: CacheConfig  # with the block count the runner allocated
    model_dir: Path


def load_rank_model(spec: ModelSpec, group: TPGroup = SINGLE):
    """``group.rank``'s shard of the model, quantized and calibrated as ``spec`` says. Returns the
    model, its config and the Hugging Face directory it came from."""
    from neuronserve.model.loader import load_model

    module, config, hf_dir = load_model(spec.model, dtype=spec.torch_dtype, tp_group=group)
    stored = getattr(module, "quantization", None)
    if spec.quantization is not None and stored is not None:
        raise ValueError(f"quantization: {spec.model} is already quantized ({stored['method']})")
    if spec.quantization is not None:
        from neuronserve.quant import quantize_model

        quantize_model(module, spec.quantization, spec.modules_to_not_convert)
    if spec.cache_config.cache_dtype != "auto":
        from neuronserve.model.tokenizer import Tokenizer
        from neuronserve.quant.kv import CALIBRATION_TEXT, calibrate_kv_scales

        # Every rank runs the same calibration prefill (its collectives meet the others').
        kv_dtype = kv_cache_torch_dtype(spec.cache_config, spec.torch_dtype)
        calibrate_kv_scales(module, Tokenizer.from_dir(hf_dir).encode(CALIBRATION_TEXT), kv_dtype)
    return module, config, hf_dir


def build_rank(spec: ModelSpec, group: TPGroup = SINGLE) -> BuiltRank:
    """Build ``group.rank``'s runner for ``spec``. A backend that shards itself (``neuron``) gets
    the whole model here and a function that builds any rank's shard."""
    from neuronserve.engine.engine import blocks_for_memory  # sizing rule shared with the engine
    from neuronserve.parallel.heads import HeadLayout

    backend = get_backend(spec.backend)  # unknown names fail before the model loads
    module, config, hf_dir = load_rank_model(spec, group)
    cache_config = spec.cache_config
    if spec.kv_cache_gb is not None:
        layout = HeadLayout(config.num_attention_heads, config.num_key_value_heads, spec.tensor_parallel_size)
        num_blocks = blocks_for_memory(
            config,
            spec.scheduler_config,
            cache_config.block_size,
            spec.kv_cache_gb,
            kv_cache_torch_dtype(cache_config, spec.torch_dtype).itemsize,
            kv_heads=layout.kv_per_rank,
        )
        cache_config = dataclasses.replace(cache_config, num_blocks=num_blocks)
    args = (module, config, cache_config, spec.scheduler_config, spec.compile_config)
    if backend.shards_itself:
        rank_spec = dataclasses.replace(spec, cache_config=cache_config)
        runner = backend.build_runner(
            *args,
            tensor_parallel_size=spec.tensor_parallel_size,
            rank_model_fn=functools.partial(_rank_model, rank_spec),
        )
    elif backend.uses_kernels:
        runner = backend.build_runner(*args, kernels=spec.kernels)
    else:
        runner = backend.build_runner(*args)
    return BuiltRank(runner, config, cache_config, hf_dir)


def _rank_model(spec: ModelSpec, group: TPGroup) -> torch.nn.Module:
    return load_rank_model(spec, group)[0]

"""The static-graph runner shared by ``cpu-traced`` and ``neuron``: every step is padded to a
bucket and runs that bucket's graph, compiled once and kept in the artifact cache.

Subclasses say how a bucket's graph is compiled to bytes and loaded back (``torch.export`` on
CPU, ``torch_neuronx.trace`` on Neuron); bucket choice, padding, the cache key and the cache
itself are the same code for both, so what CI runs on CPU is what a Neuron host runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter

import torch

from neuronserve.backends.artifacts import ArtifactCache, cache_key, load_or_compile, open_store
from neuronserve.backends.base import ChunkModelRunner, kv_cache_torch_dtype
from neuronserve.backends.inputs import SeqChunk, StepInputs, build_step_inputs, check_token_ids
from neuronserve.config import CacheConfig, CompileConfig, ModelConfig, SchedulerConfig
from neuronserve.core import PAD_BLOCK_ID
from neuronserve.core.buckets import Bucket, make_buckets, pick_bucket


def weight_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes): quantized weights and
    calibrated KV scales included."""
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class StaticGraphRunner(ChunkModelRunner):
    backend_name = ""
    extension = ""

    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        compile_config: CompileConfig | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        self.compile_config = compile_config or CompileConfig()
        self.buckets = make_buckets(scheduler_config, cache_config, self.compile_config)
        dtype = kv_cache_torch_dtype(cache_config, next(model.parameters()).dtype)
        self.kv_cache = torch.zeros(
            model.kv_cache_shape(cache_config.num_blocks, cache_config.block_size), dtype=dtype
        )
        self.key_parts = self._key_parts()
        self.cache = ArtifactCache(
            open_store(self.compile_config.artifact_cache), cache_key(self.key_parts), self.key_parts
        )
        self.prepare()
        artifacts, self.compiled = load_or_compile(
            self.cache, self.buckets, self.compile_bucket, self.extension, self.compile_config.progress
        )
        self.graphs = {bucket: self.load_graph(data) for bucket, data in artifacts.items()}
        self.calls: Counter[Bucket] = Counter()

    # ---------------------------------------------------------------- for subclasses
    def prepare(self) -> None:
        """Checks before anything is compiled or loaded."""

    def tool_versions(self) -> dict[str, str]:
        from neuronserve import __version__

        return {"torch": torch.__version__, "neuronserve": __version__}

    def compiler_args(self) -> list[str]:
        return []

    def compile_bucket(self, bucket: Bucket) -> bytes:
        raise NotImplementedError

    def load_graph(self, data: bytes):
        raise NotImplementedError

    def run_graph(self, graph, inputs: StepInputs) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- shared
    def _key_parts(self) -> dict:
        return {
            "backend": self.backend_name,
            "model_config": dataclasses.asdict(self.model_config),
            "weights": weight_fingerprint(self.model),
            "quantization": getattr(self.model, "quantization", None),
            "tensor_parallel_size": self.model.tp_group.size,
            "buckets": [b.name for b in self.buckets],
            "kv_cache": [str(self.kv_cache.dtype), list(self.kv_cache.shape)],
            "versions": self.tool_versions(),
            "compiler_args": self.compiler_args(),
        }

    def example_inputs(self, bucket: Bucket) -> StepInputs:
        """A step of the bucket's exact shapes (one token of one sequence, the rest padding)."""
        return build_step_inputs(
            [SeqChunk([0], 0, [PAD_BLOCK_ID])],
            self.cache_config.block_size,
            num_tokens=bucket.num_tokens,
            num_seqs=bucket.num_seqs,
            max_blocks=bucket.max_blocks,
            num_logits=bucket.logit_rows,
        )

    @torch.inference_mode()
    def run_chunks(self, chunks: list[SeqChunk]) -> torch.Tensor:
        if not chunks:
            return torch.empty(0, self.model_config.vocab_size)
        check_token_ids(chunks, self.model_config.vocab_size)
        block_size = self.cache_config.block_size
        num_tokens = sum(len(c.token_ids) for c in chunks)
        num_blocks = max(-(-(c.start + len(c.token_ids)) // block_size) for c in chunks)
        num_logits = sum(c.num_logits for c in chunks)
        bucket = pick_bucket(self.buckets, num_tokens, len(chunks), num_blocks, num_logits)
        inputs = build_step_inputs(
            chunks,
            block_size,
            num_tokens=bucket.num_tokens,
            num_seqs=bucket.num_seqs,
            max_blocks=bucket.max_blocks,
            num_logits=bucket.logit_rows,
        )
        logits = self.run_graph(self.graphs[bucket], inputs)
        self.calls[bucket] += 1
        return logits[:num_logits].float()

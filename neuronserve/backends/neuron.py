"""``neuron``: per-bucket graphs compiled with ``torch_neuronx.trace`` for Inferentia2 / Trainium.

Written against the public Neuron SDK API (torch-neuronx 2.x, neuronx-distributed 0.x; see
``docs/neuron.md``) and import-guarded: this module imports without the SDK, and building the
runner without it raises ``ImportError`` saying what to install. **Not run on a device here**:
what is verified without one is the call contract (tests with a fake ``torch_neuronx`` that
records the calls), the step functions and buckets (shared with ``cpu-traced``, which runs them
on CPU), the artifact cache (local and S3) and the fit check.

Per bucket: ``NeuronStep`` (the model's step with the KV cache held as device state) is traced
with example inputs of the bucket's static shapes; ``input_output_aliases={kv_cache: 1}`` makes
the compiled graph update the cache in place on the NeuronCore instead of copying it out and
back; weights are not inlined into the NEFF (``inline_weights_to_neff=False``), so the artifacts
hold graphs only and every bucket is handed the same weight and cache tensors
(``torch_neuronx.replace_weights``). With ``tensor_parallel_size`` > 1 the graphs are traced by
``neuronx_distributed.trace.parallel_model_trace``, which builds each rank's shard in its own
worker with the same parallel layers as CPU, their collectives mapped onto neuronx_distributed's.
"""

from __future__ import annotations

import importlib.metadata
import io
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from neuronserve.backends.base import Backend, register_backend
from neuronserve.backends.inputs import StepInputs
from neuronserve.backends.static import StaticGraphRunner
from neuronserve.core.buckets import Bucket
from neuronserve.parallel.group import TPGroup

INSTALL_HINT = (
    "the neuron backend needs the AWS Neuron SDK (torch-neuronx, neuronx-cc; neuronx-distributed for "
    "tensor_parallel_size > 1), which installs on Inf2/Trn1/Trn2 hosts from the Neuron pip repository: "
    "see docs/neuron.md. On other machines use backend='cpu-traced' (the same per-bucket graphs on CPU)"
)


def import_torch_neuronx():
    try:
        import torch_neuronx
    except ImportError as exc:
        raise ImportError(f"backend neuron: {INSTALL_HINT}") from exc
    return torch_neuronx


class NeuronStep(nn.Module):
    """One step with the KV cache as module state; output 1 is the cache (aliased to it)."""

    def __init__(self, model: nn.Module, kv_cache: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.kv_cache = nn.Parameter(kv_cache, requires_grad=False)

    def forward(self, *step_inputs):  # StepInputs.as_args()
        logits, _ = self.model(*step_inputs, self.kv_cache)
        return logits, self.kv_cache


class NxDGroup(TPGroup):
    """The tensor-parallel group of a neuronx_distributed worker: its rank and size, and its
    collectives (which the compiler lowers to NeuronLink collectives inside the graph)."""

    def __init__(self) -> None:
        from neuronx_distributed.parallel_layers import mappings, parallel_state

        self.rank = parallel_state.get_tensor_model_parallel_rank()
        self.size = parallel_state.get_tensor_model_parallel_size()
        self._mappings = mappings

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._mappings.reduce_from_tensor_model_parallel_region(tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if dim not in (-1, tensor.dim() - 1):
            raise ValueError(f"dim: neuronx_distributed gathers along the last dimension, got {dim}")
        return self._mappings.gather_from_tensor_model_parallel_region(tensor)


class NeuronRunner(StaticGraphRunner):
    backend_name = "neuron"
    extension = "neuron.pt"  # a TorchScript archive with the NEFF inside (a tar of ranks at TP > 1)

    def __init__(self, *args, tensor_parallel_size: int = 1, rank_model_fn: Callable | None = None, **kwargs):
        self.tensor_parallel_size = tensor_parallel_size
        self.rank_model_fn = rank_model_fn
        self._extract_dirs: list[tempfile.TemporaryDirectory] = []
        super().__init__(*args, **kwargs)

    def prepare(self) -> None:
        self.torch_neuronx = import_torch_neuronx()
        tp = self.tensor_parallel_size
        if tp > 1 and self.rank_model_fn is None:
            raise ValueError("tensor_parallel_size: the neuron backend needs a rank model builder for TP > 1")
        target = self.compile_config.target
        if target is not None:
            from neuronserve.hardware import check_fit

            quant = getattr(self.model, "quantization", None)
            check_fit(
                self.model_config,
                target,
                tp,
                dtype_bytes=next(self.model.parameters()).element_size(),
                quantization=quant["method"] if quant else None,
                kv_tokens=self.cache_config.num_blocks * self.cache_config.block_size,
                kv_dtype_bytes=self.kv_cache.element_size(),
                max_bucket_tokens=max(b.num_tokens for b in self.buckets),
            )
        self.step = NeuronStep(self.model, self.kv_cache)

    def _key_parts(self) -> dict:
        parts = super()._key_parts()
        parts["tensor_parallel_size"] = self.tensor_parallel_size
        return parts

    def tool_versions(self) -> dict[str, str]:
        versions = super().tool_versions()
        for package in ("torch-neuronx", "neuronx-cc", "neuronx-distributed"):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = "absent"
        return versions

    def compiler_args(self) -> list[str]:
        return self.compile_config.compiler_args()

    def _workdir(self, bucket: Bucket) -> str:
        root = Path(tempfile.gettempdir()) / "neuronserve-neuronx-cc" / self.cache.key[:16] / bucket.name
        root.mkdir(parents=True, exist_ok=True)
        return str(root)

    def compile_bucket(self, bucket: Bucket) -> bytes:
        example = self.example_inputs(bucket).as_args()
        if self.tensor_parallel_size > 1:
            return self._compile_parallel(bucket, example)
        traced = self.torch_neuronx.trace(
            self.step,
            example,
            compiler_workdir=self._workdir(bucket),
            compiler_args=self.compiler_args(),
            input_output_aliases={self.step.kv_cache: 1},
            inline_weights_to_neff=False,
        )
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        return buffer.getvalue()

    def _compile_parallel(self, bucket: Bucket, example) -> bytes:
        from neuronx_distributed.trace import parallel_model_save, parallel_model_trace

        cache_shape = self.kv_cache.shape
        block_size, dtype = self.cache_config.block_size, self.kv_cache.dtype
        rank_model_fn = self.rank_model_fn

        def build_rank():  # runs in each neuronx_distributed worker
            model = rank_model_fn(NxDGroup())
            kv = torch.zeros(model.kv_cache_shape(cache_shape[2], block_size), dtype=dtype)
            step = NeuronStep(model, kv)
            return step, {step.kv_cache: 1}

        traced = parallel_model_trace(
            build_rank,
            example,
            tp_degree=self.tensor_parallel_size,
            compiler_workdir=self._workdir(bucket),
            compiler_args=self.compiler_args(),
            inline_weights_to_neff=True,  # each rank's shard lives in its own NEFF
        )
        with tempfile.TemporaryDirectory() as tmp:
            parallel_model_save(traced, tmp)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                tar.add(tmp, arcname=".")
        return buffer.getvalue()

    def load_graph(self, data: bytes):
        if self.tensor_parallel_size > 1:
            from neuronx_distributed.trace import parallel_model_load

            extract = tempfile.TemporaryDirectory(prefix="neuronserve-tp-")
            self._extract_dirs.append(extract)  # the loaded model may read from it while alive
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                tar.extractall(extract.name, filter="data")
            return parallel_model_load(extract.name)
        graph = torch.jit.load(io.BytesIO(data))
        # Every bucket gets the same weight and KV-cache tensors (not inlined in the NEFF).
        self.torch_neuronx.replace_weights(graph, self.step.state_dict())
        return graph

    def run_graph(self, graph, inputs: StepInputs) -> torch.Tensor:
        logits, _ = graph(*inputs.as_args())
        return logits


@register_backend("neuron")
class NeuronBackend(Backend):
    """Shards across NeuronCores itself (neuronx_distributed), so the engine builds one runner."""

    shards_itself = True

    def build_runner(
        self,
        model,
        model_config,
        cache_config,
        scheduler_config,
        compile_config=None,
        tensor_parallel_size: int = 1,
        rank_model_fn=None,
    ):
        return NeuronRunner(
            model,
            model_config,
            cache_config,
            scheduler_config,
            compile_config,
            tensor_parallel_size=tensor_parallel_size,
            rank_model_fn=rank_model_fn,
        )

"""``cpu-traced``: the Neuron path's twin on CPU. Each bucket's step function is captured with
``torch.export.export`` as one static graph (no graph breaks: export fails on any data-dependent
control flow), saved as a ``.pt2`` program in the artifact cache, and run on CPU.

The programs hold the graph and small constants only: the weights are stubbed out before saving
and the model's own tensors are attached on load, so every bucket shares one copy of them and an
artifact is kilobytes, not the model's size (the Neuron path does the same with
``inline_weights_to_neff=False``). The KV cache is an input that the graph updates in place
(``index_copy_`` survives export as an in-place op), so all buckets share one cache.
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from neuronserve.backends.base import Backend, register_backend
from neuronserve.backends.inputs import StepInputs
from neuronserve.backends.static import StaticGraphRunner
from neuronserve.core.buckets import Bucket


class TracedStep(nn.Module):
    """One step of the model: ``StepInputs.as_args()`` then the KV cache (updated in place)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *step_inputs_and_kv_cache):
        return self.model(*step_inputs_and_kv_cache)


def _stub_weights(program: torch.export.ExportedProgram) -> None:
    """Replace the program's weights by one-element stand-ins of the same shape (an expanded
    scalar serializes as one value)."""
    for name, tensor in list(program.state_dict.items()):
        stub = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
        program.state_dict[name] = (
            nn.Parameter(stub, requires_grad=False) if isinstance(tensor, nn.Parameter) else stub
        )


class CPUTracedRunner(StaticGraphRunner):
    backend_name = "cpu-traced"
    extension = "pt2"

    def prepare(self) -> None:
        if self.model.tp_group.size > 1:
            raise ValueError(
                "tensor_parallel_size: cpu-traced runs at TP 1 (a gloo collective cannot be exported); use "
                "the cpu backend for multi-process TP, or neuron, where neuronx_distributed shards the graphs"
            )
        self.step = TracedStep(self.model)

    def export(self, bucket: Bucket) -> torch.export.ExportedProgram:
        args = (*self.example_inputs(bucket).as_args(), torch.zeros_like(self.kv_cache))
        with torch.no_grad():
            return torch.export.export(self.step, args)

    def compile_bucket(self, bucket: Bucket) -> bytes:
        program = self.export(bucket)
        _stub_weights(program)
        program.example_inputs = None  # they hold a KV cache's worth of zeros
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no complete tensor found": the stubs, by design
            torch.export.save(program, buffer)
        return buffer.getvalue()

    def load_graph(self, data: bytes):
        module = torch.export.load(io.BytesIO(data)).module()
        module.load_state_dict(self.step.state_dict(), strict=False, assign=True)  # the shared weights
        return module

    def run_graph(self, graph, inputs: StepInputs) -> torch.Tensor:
        logits, _ = graph(*inputs.as_args(), self.kv_cache)
        return logits


@register_backend("cpu-traced")
class CPUTracedBackend(Backend):
    def build_runner(self, model, model_config, cache_config, scheduler_config, compile_config=None):
        return CPUTracedRunner(model, model_config, cache_config, scheduler_config, compile_config)

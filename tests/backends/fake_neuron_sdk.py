"""Stand-ins for ``torch_neuronx`` and ``neuronx_distributed`` that follow their public signatures
and record every call (no compiler, no device). The graphs they return produce zero logits of
the right shape: these fakes check the *call contract*; cpu-traced checks the numbers."""

from __future__ import annotations

import types
from pathlib import Path

import torch


class _CompiledStandIn(torch.nn.Module):
    """What a Neuron trace returns, as far as the runner can tell: (logits [B, V], state)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(
        self, input_ids, positions, slot_mapping, block_tables, context_lens, query_start_loc, logits_indices
    ):
        return torch.zeros(logits_indices.shape[0], self.vocab), input_ids


def _param_names(module: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


def make_torch_neuronx() -> types.ModuleType:
    fake = types.ModuleType("torch_neuronx")
    fake.__version__ = "2.9.0+fake"
    fake.trace_calls, fake.replace_calls = [], []

    def trace(
        func,
        example_inputs,
        *_,
        input_output_aliases={},  # noqa: B006 (the public signature's default)
        compiler_workdir=None,
        compiler_args=None,
        partitioner_config=None,
        inline_weights_to_neff=True,
        cpu_backend=False,
    ):
        names = _param_names(func)
        with torch.no_grad():  # tracing runs the function once on the example inputs
            logits, state = func(*example_inputs)
        fake.trace_calls.append(
            {
                "shapes": [tuple(t.shape) for t in example_inputs],
                "dtypes": [t.dtype for t in example_inputs],
                "aliases": {names[id(t)]: index for t, index in input_output_aliases.items()},
                "compiler_args": list(compiler_args),
                "compiler_workdir": compiler_workdir,
                "inline_weights_to_neff": inline_weights_to_neff,
                "output_shapes": [tuple(logits.shape), tuple(state.shape)],
            }
        )
        return torch.jit.script(_CompiledStandIn(logits.shape[-1]))

    def replace_weights(neuron_model, weights):
        fake.replace_calls.append(weights)

    fake.trace, fake.replace_weights = trace, replace_weights
    return fake


def make_neuronx_distributed(tp_degree: int) -> dict[str, types.ModuleType]:
    """The modules ``neuronx_distributed`` exposes that the backend uses; rank 0 of ``tp_degree``."""
    root = types.ModuleType("neuronx_distributed")
    trace_mod = types.ModuleType("neuronx_distributed.trace")
    layers = types.ModuleType("neuronx_distributed.parallel_layers")
    state = types.ModuleType("neuronx_distributed.parallel_layers.parallel_state")
    mappings = types.ModuleType("neuronx_distributed.parallel_layers.mappings")
    state.get_tensor_model_parallel_rank = lambda: 0
    state.get_tensor_model_parallel_size = lambda: tp_degree
    mappings.reduce_from_tensor_model_parallel_region = lambda t: t
    mappings.gather_from_tensor_model_parallel_region = lambda t: torch.cat([t] * tp_degree, dim=-1)
    layers.parallel_state, layers.mappings = state, mappings
    root.trace, root.parallel_layers = trace_mod, layers
    trace_mod.calls = []

    def parallel_model_trace(
        func, example_inputs, compiler_workdir=None, compiler_args=None, inline_weights_to_neff=True,
        bucket_config=None, tp_degree=1, max_parallel_compilations=None,
    ):  # fmt: skip
        step, aliases = func()  # what each worker does, for rank 0
        names = _param_names(step)
        with torch.no_grad():
            logits, _ = step(*example_inputs)
        trace_mod.calls.append(
            {
                "tp_degree": tp_degree,
                "shapes": [tuple(t.shape) for t in example_inputs],
                "aliases": {names[id(t)]: i for t, i in aliases.items()},
                "qkv_shape": tuple(step.model.layers[0].self_attn.qkv_proj.weight.shape),
                "kv_cache_shape": tuple(step.kv_cache.shape),
                "logits_shape": tuple(logits.shape),
                "compiler_args": list(compiler_args),
            }
        )
        return {"vocab": logits.shape[-1]}

    def parallel_model_save(model, path):
        (Path(path) / "tp0.pt").write_text(str(model["vocab"]))

    def parallel_model_load(path):
        vocab = int((Path(path) / "tp0.pt").read_text())
        return torch.jit.script(_CompiledStandIn(vocab))

    trace_mod.parallel_model_trace = parallel_model_trace
    trace_mod.parallel_model_save = parallel_model_save
    trace_mod.parallel_model_load = parallel_model_load
    return {m.__name__: m for m in (root, trace_mod, layers, state, mappings)}

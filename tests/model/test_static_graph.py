"""Each bucket is one static graph whatever the batch holds: the step exported under two very
different batches of the same shapes gives the same graph (a Python int read from batch contents
would be baked in, or refused, and the graphs would differ), and it holds none of the ops that
torch-xla 2.9 ran on the CPU instead of lowering (found by benchmarks/neuron_fidelity.py).
The full check on torch-xla is that script; this guards the property on torch 2.13 alone."""

import pytest
import torch

from neuronserve.backends.inputs import SeqChunk, build_step_inputs
from neuronserve.backends.traced import TracedStep
from neuronserve.model.llama import LlamaForCausalLM
from tests.model.conftest import BLOCK_SIZE, make_pair
from tests.parallel.test_layers import RankOf

# Ops torch-xla 2.9 fell back to the CPU for (measured): they would split a graph on a device.
NOT_LOWERED = ("searchsorted", "aten.view.dtype", "_local_scalar_dense")
PAD = dict(num_tokens=16, num_seqs=4, max_blocks=8)


def _variant(kind: str) -> LlamaForCausalLM:
    hf, model = make_pair("gqa-9-3-llama3")
    if kind in ("int8", "int4"):
        from neuronserve.quant import quantize_model

        quantize_model(model, kind, group_size=16)  # 16 divides this config's widths
    if kind == "tp2-rank1":
        model = LlamaForCausalLM(model.config, RankOf(1, 2))  # collectives: identity here
        model.load_weights(hf.state_dict().items())
    return model.eval().requires_grad_(False)


def _graph(model, chunks) -> str:
    inputs = build_step_inputs(chunks, BLOCK_SIZE, **PAD)
    kv = torch.zeros(model.kv_cache_shape(32, BLOCK_SIZE))
    with torch.no_grad():
        program = torch.export.export(TracedStep(model), (*inputs.as_args(), kv))
    return program.graph_module.code


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4", "tp2-rank1"])
def test_one_graph_per_bucket_whatever_the_batch_holds(kind):
    model = _variant(kind)
    one_prefill = [SeqChunk([1, 2, 3], 0, [1])]
    mixed = [  # decodes deep into context, a chunk of a later prefill, another decode
        SeqChunk([5], 29, [2, 3, 4, 5, 6, 7, 8, 9]),
        SeqChunk([6, 7, 8, 9, 10, 11, 12], 4, [10, 11, 12]),
        SeqChunk([13], 3, [13]),
    ]
    first, second = _graph(model, one_prefill), _graph(model, mixed)
    assert first == second
    for op in NOT_LOWERED:
        assert op not in first, op

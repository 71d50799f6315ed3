"""The neuron backend's calls into the Neuron SDK, against fakes that follow its public API: one
trace per bucket with that bucket's static example inputs, the compiler arguments, the KV cache
aliased to output 1, weights not inlined and handed over shared; nothing compiled on a second
start; a clear error without the SDK; TP through neuronx_distributed."""

import copy
import sys

import pytest
import torch

from neuronserve.backends import get_backend
from neuronserve.backends.inputs import SeqChunk
from neuronserve.config import CacheConfig, CompileConfig, SchedulerConfig
from neuronserve.model.llama import LlamaForCausalLM
from neuronserve.parallel.heads import HeadLayout
from tests.backends.fake_neuron_sdk import make_neuronx_distributed, make_torch_neuronx
from tests.model.conftest import make_pair

SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, token_buckets=(8, 16))
CACHE = CacheConfig(block_size=4, num_blocks=40)


@pytest.fixture
def fake(monkeypatch):
    module = make_torch_neuronx()
    monkeypatch.setitem(sys.modules, "torch_neuronx", module)
    return module


def _build(model, tmp_path, **compile_kwargs):
    config = CompileConfig(
        context_buckets=(16,), artifact_cache=str(tmp_path), progress=False, **compile_kwargs
    )
    return get_backend("neuron").build_runner(copy.deepcopy(model), model.config, CACHE, SCHED, config)


def test_one_trace_per_bucket_with_its_shapes_args_and_aliases(fake, tmp_path):
    _, model = make_pair("gqa-9-3-llama3")
    runner = _build(model, tmp_path, optlevel=2, lnc=2, target="trn2.48xlarge")
    assert len(fake.trace_calls) == len(runner.buckets) == 4
    vocab = model.config.vocab_size
    for bucket, call in zip(runner.buckets, fake.trace_calls):
        t, b, k = bucket.num_tokens, bucket.num_seqs, bucket.max_blocks
        assert call["shapes"] == [(t,), (t,), (t,), (b, k), (b,), (b + 1,), (b,)]
        assert all(d == torch.int64 for d in call["dtypes"])
        assert call["compiler_args"] == ["--model-type=transformer", "--auto-cast=none", "-O2", "--lnc=2"]
        assert call["aliases"] == {"kv_cache": 1}  # the cache is updated in place on the device
        assert call["inline_weights_to_neff"] is False
        assert call["compiler_workdir"].endswith(bucket.name)
        assert call["output_shapes"] == [(b, vocab), tuple(runner.kv_cache.shape)]
    # every bucket's graph gets the same weights and the same KV-cache tensor
    assert len(fake.replace_calls) == 4
    for weights in fake.replace_calls:
        assert weights["kv_cache"].data_ptr() == runner.kv_cache.data_ptr()
        assert "model.layers.0.self_attn.qkv_proj.weight" in weights
    logits = runner.run_chunks([SeqChunk([3, 4, 5], 0, [1]), SeqChunk([6], 9, [2, 3, 4])])
    assert logits.shape == (2, vocab)

    again = _build(model, tmp_path, optlevel=2, lnc=2, target="trn2.48xlarge")
    assert again.compiled == [] and len(fake.trace_calls) == 4  # nothing traced on the second start
    _build(model, tmp_path, optlevel=1, lnc=2, target="trn2.48xlarge")  # other flags, other key
    assert len(fake.trace_calls) == 8


def test_without_the_sdk_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)  # import fails
    _, model = make_pair("mqa-7-1")
    with pytest.raises(ImportError, match="needs the AWS Neuron SDK .* backend='cpu-traced'"):
        _build(model, tmp_path)


def test_tensor_parallel_traces_through_neuronx_distributed(fake, monkeypatch, tmp_path):
    for name, module in make_neuronx_distributed(tp_degree=2).items():
        monkeypatch.setitem(sys.modules, name, module)
    hf, model = make_pair("gqa-9-3-llama3")
    weights = hf.state_dict()

    def rank_model(group):
        shard = LlamaForCausalLM(model.config, group)
        shard.load_weights(weights.items())
        return shard

    config = CompileConfig(context_buckets=(16,), artifact_cache=str(tmp_path), progress=False)
    runner = get_backend("neuron").build_runner(
        copy.deepcopy(model),
        model.config,
        CACHE,
        SCHED,
        config,
        tensor_parallel_size=2,
        rank_model_fn=rank_model,
    )
    calls = sys.modules["neuronx_distributed.trace"].calls
    layout = HeadLayout(9, 3, 2)
    hd = model.config.head_dim
    assert len(calls) == len(runner.buckets) and fake.trace_calls == []
    for bucket, call in zip(runner.buckets, calls):
        assert call["tp_degree"] == 2 and call["aliases"] == {"kv_cache": 1}
        assert call["qkv_shape"] == (
            (layout.q_per_rank + 2 * layout.kv_per_rank) * hd,
            model.config.hidden_size,
        )
        assert call["kv_cache_shape"][3] == layout.kv_per_rank
        assert call["logits_shape"] == (bucket.num_seqs, model.config.vocab_size)  # gathered, trimmed
    assert runner.run_chunks([SeqChunk([3, 4], 0, [1])]).shape == (1, model.config.vocab_size)

"""The sharded model on 2 and 4 gloo ranks gives the unsharded model's logits, padding cases
included, with every shard's shape as the head layout says."""

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from neuronserve.parallel.group import SINGLE
from neuronserve.parallel.heads import HeadLayout
from tests.parallel.ranks import model_logits, quantized_logits, run_ranks

# name -> (query heads, KV heads, tie embeddings); hidden = 16 * heads, vocab 211 (odd: padded)
CONFIGS = {
    "gqa-9-3": (9, 3, False),  # SmolLM2's heads: query padding at TP 2, KV replication at TP 4
    "mha-5-tied": (5, 5, True),  # 5 KV heads over 2 ranks: a replicated slot; tied vocab-parallel head
    "mqa-7-1": (7, 1, False),  # one KV head on every rank
    "gqa-8-4": (8, 4, False),  # the divisible case: no padding
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    dirs = {}
    for i, (name, (heads, kv_heads, tied)) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        hf = HFLlama(
            LlamaConfig(
                vocab_size=211,
                hidden_size=16 * heads,
                intermediate_size=90,  # not a multiple of 4: padded at TP 4
                num_hidden_layers=2,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                tie_word_embeddings=tied,
                max_position_embeddings=64,
            )
        )
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


def assert_ranks_match_tp1(name, model_dirs, results, tp):
    reference = model_logits(SINGLE, model_dirs[name])
    for kind in ("eager", "padded"):
        for step, (got, want) in enumerate(zip(results[0][kind], reference[kind])):
            where = f"{name} TP {tp} {kind} step {step}"
            torch.testing.assert_close(
                got, want, atol=1e-4, rtol=0, msg=lambda m, where=where: f"{where}: {m}"
            )
    heads, kv_heads, _ = CONFIGS[name]
    layout = HeadLayout(heads, kv_heads, tp)
    hd, hidden = 16, 16 * heads
    for result in results:
        shapes = result["shapes"]
        assert shapes["layers.0.self_attn.qkv_proj.weight"] == (
            (layout.q_per_rank + 2 * layout.kv_per_rank) * hd,
            hidden,
        )
        assert shapes["layers.0.self_attn.o_proj.weight"] == (hidden, layout.q_per_rank * hd)
        assert shapes["layers.0.mlp.gate_up_proj.weight"] == (2 * -(-90 // tp), hidden)
        assert shapes["layers.0.mlp.down_proj.weight"] == (hidden, -(-90 // tp))
        assert shapes["embed_tokens.weight"] == (-(-211 // tp), hidden)
        if not CONFIGS[name][2]:
            assert shapes["lm_head.weight"] == (-(-211 // tp), hidden)
        assert shapes["kv_cache"] == (2, 2, 8, layout.kv_per_rank, 4, hd)
        # every rank computes the same gathered logits
        torch.testing.assert_close(result["eager"][-1], results[0]["eager"][-1])


def _run_all(group, dirs):
    return {name: model_logits(group, path) for name, path in dirs.items()}


# TP 4 runs four ranks on this 2-core machine: make test-all.
@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_tensor_parallel_logits_equal_tp1(model_dirs, tp):
    dirs = model_dirs if tp == 2 else {k: model_dirs[k] for k in ("gqa-9-3", "mha-5-tied")}
    per_rank = run_ranks(_run_all, tp, dirs)
    for name in dirs:
        assert_ranks_match_tp1(name, model_dirs, [r[name] for r in per_rank], tp)


def test_int8_weights_and_kv_cache_at_tp2_are_as_accurate_as_at_tp1(model_dirs):
    """Row-parallel layers quantize each shard with its own per-channel scales, so TP 2's int8
    logits are not TP 1's bit for bit; they must be as close to the fp32 logits."""
    path = model_dirs["gqa-9-3"]
    exact = model_logits(SINGLE, path)["eager"]
    tp1 = quantized_logits(SINGLE, path)
    tp2 = run_ranks(quantized_logits, 2, path)[0]
    for want, one, two in zip(exact, tp1, tp2):
        err1, err2 = (one - want).abs().max().item(), (two - want).abs().max().item()
        assert 0 < err2 <= 2 * err1 + 1e-3, (err1, err2)

"""The quantized KV cache: quality against the float cache, and 4x the blocks for the same memory."""

import copy
from pathlib import Path

import pytest
import torch

from neuronserve import LLM, SamplingParams
from neuronserve.config import CacheConfig
from neuronserve.model.loader import load_model
from neuronserve.model.tokenizer import Tokenizer
from neuronserve.quant.kv import CALIBRATION_TEXT, calibrate_kv_scales
from neuronserve.quant.quality import score_text
from tests.engine.conftest import assert_all_blocks_free

TEXT = (Path(__file__).parent / "data" / "heldout.txt").read_text()
GATES = {torch.int8: 0.01, torch.float8_e4m3fn: 0.03}  # most perplexity may rise over the fp32 cache


@pytest.fixture(scope="module")
def smollm2():
    model, _, hf_dir = load_model("smollm2-135m-instruct")
    return model, Tokenizer.from_dir(hf_dir)


@pytest.fixture(scope="module")
def fp32_cache_score(smollm2):
    model, tokenizer = smollm2
    return score_text(model, tokenizer.encode(TEXT, add_special_tokens=False))


# The default path (native) gates every format in the default suite; the torch path's gates are slow
# (its int8/int4 layers dequantize) and run in `make test-all`.
@pytest.mark.parametrize("kernels", [pytest.param("torch", marks=pytest.mark.slow), "native"])
@pytest.mark.parametrize("dtype", sorted(GATES, key=str))
def test_quantized_kv_cache_keeps_the_perplexity(smollm2, fp32_cache_score, dtype, kernels):
    model, tokenizer = smollm2
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    reference = fp32_cache_score
    quantized = copy.deepcopy(model)
    calibrate_kv_scales(quantized, tokenizer.encode(CALIBRATION_TEXT), dtype)
    scales = torch.stack([layer.self_attn.kv_scale for layer in quantized.layers])
    assert (scales > 0).all() and scales.std() > 0  # calibrated per layer and head, not a constant
    score = score_text(quantized, ids, kv_dtype=dtype, kernels=kernels)
    rise = score.perplexity / reference.perplexity - 1
    agreement = (score.argmax == reference.argmax).float().mean().item()
    print(f"{dtype} KV ({kernels}): {score.perplexity:.3f} vs {reference.perplexity:.3f}, {agreement:.1%}")
    assert rise <= GATES[dtype] and agreement > 0.9


def test_an_int8_cache_holds_four_times_the_blocks_and_answers():
    fp32 = LLM(max_num_seqs=16, max_model_len=256, kv_cache_gb=0.02)
    int8 = LLM(max_num_seqs=16, max_model_len=256, kv_cache_gb=0.02, kv_cache_dtype="int8")
    assert int8.engine.cache_config.num_blocks >= 4 * fp32.engine.cache_config.num_blocks - 4
    assert int8.engine.runner.kv_cache.dtype == torch.int8
    question = [{"role": "user", "content": "What is the capital of France?"}]
    (out,) = int8.chat(question, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    assert "Paris" in out.outputs[0].text
    assert_all_blocks_free(int8.engine)
    with pytest.raises(ValueError, match="^cache_dtype: must be auto, int8 or fp8"):
        CacheConfig(cache_dtype="int4")

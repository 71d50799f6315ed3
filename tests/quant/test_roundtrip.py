"""Convert, save, load: the same logits, and nothing recomputed at load."""

import pytest
import torch

from neuronserve import LLM, SamplingParams
from neuronserve.cli import main
from neuronserve.engine.engine import Engine
from neuronserve.model.loader import load_model
from neuronserve.quant import Int8Linear, quantize_model
from neuronserve.quant.quality import score_text


def test_quantize_cli_round_trip_gives_the_same_logits(tmp_path, capsys):
    out = tmp_path / "smollm2-int8"
    assert main(["quantize", "--dtype", "int8", "--quantize-lm-head", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "quantization_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "model.safetensors").stat().st_size < 250e6  # fp32 would be ~540 MB

    loaded, _, _ = load_model(str(out))
    assert isinstance(loaded.layers[0].self_attn.qkv_proj, Int8Linear) and isinstance(
        loaded.lm_head, Int8Linear
    )
    reference, _, _ = load_model("smollm2-135m-instruct")
    quantize_model(reference, "int8", ["embed_tokens"])
    ids = list(range(300, 340))
    torch.testing.assert_close(score_text(loaded, ids).perplexity, score_text(reference, ids).perplexity)
    for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)

    llm = LLM(str(out), max_num_seqs=2, max_model_len=256, kv_cache_gb=0.05)
    (answer,) = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=8, temperature=0),
        use_tqdm=False,
    )
    assert "Paris" in answer.outputs[0].text


def test_a_quantized_directory_is_not_quantized_twice(tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--dtype", "int8", "--out", str(out)]) == 0
    with pytest.raises(ValueError, match="^quantization: .* is already quantized \\(int8\\)"):
        Engine.from_pretrained(str(out), quantization="int8")

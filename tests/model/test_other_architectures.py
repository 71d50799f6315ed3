"""Qwen2 (q/k/v bias) and Mistral (full attention) through the same model code."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from neuronserve.backends.inputs import SeqChunk
from neuronserve.config import ModelConfig
from neuronserve.model.llama import LlamaForCausalLM
from tests.model.conftest import PagedRunner

COMMON = dict(
    vocab_size=97,
    hidden_size=96,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


@pytest.mark.parametrize(
    "hf_cls, cfg",
    [
        (Qwen2ForCausalLM, Qwen2Config(**COMMON, tie_word_embeddings=True)),
        (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=None)),
    ],
)
def test_logits_match_transformers(hf_cls, cfg):
    torch.manual_seed(0)
    hf = hf_cls(cfg).eval()
    biases = [p for name, p in hf.named_parameters() if name.endswith("bias")]
    assert len(biases) == (3 * COMMON["num_hidden_layers"] if hf_cls is Qwen2ForCausalLM else 0)
    with torch.no_grad():
        for p in biases:  # initialised to zero; random values make the test see them
            p.normal_()
    config = ModelConfig.from_hf_config(cfg.to_dict() | {"architectures": [hf_cls.__name__]})
    assert config.attention_bias == (hf_cls is Qwen2ForCausalLM)
    ours = LlamaForCausalLM(config).eval()
    ours.load_weights(hf.state_dict().items())
    ids = torch.randint(0, 97, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = PagedRunner(ours)
    got = runner.step([SeqChunk(ids, 0, runner.blocks(13))])
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(got[0], expected, atol=1e-4, rtol=0)

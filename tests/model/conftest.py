import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from neuronserve.backends.inputs import SeqChunk, build_step_inputs
from neuronserve.config import ModelConfig
from neuronserve.model.llama import LlamaForCausalLM

BLOCK_SIZE = 4

TINY_CONFIGS = {
    # GQA with odd head counts (9 query heads over 3 KV heads), llama3 rope scaling, untied head
    "gqa-9-3-llama3": dict(
        hidden_size=144,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # multi-head (no grouping), tied embeddings, plain rope
    "mha-5-tied": dict(
        hidden_size=80, num_attention_heads=5, num_key_value_heads=5, tie_word_embeddings=True
    ),
    # a single KV head (multi-query)
    "mqa-7-1": dict(hidden_size=112, num_attention_heads=7, num_key_value_heads=1, tie_word_embeddings=False),
}


def make_pair(name: str, seed: int = 0, num_layers: int = 3) -> tuple[HFLlama, LlamaForCausalLM]:
    torch.manual_seed(seed)
    hf_cfg = LlamaConfig(
        vocab_size=211,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        max_position_embeddings=256,
        **TINY_CONFIGS[name],
    )
    hf = HFLlama(hf_cfg).eval()
    ours = LlamaForCausalLM(ModelConfig.from_hf_config(hf_cfg.to_dict())).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


@pytest.fixture(params=sorted(TINY_CONFIGS))
def model_pair(request):
    return make_pair(request.param)


class PagedRunner:
    """Drives ``LlamaForCausalLM.forward`` directly with hand-made block tables."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int = 64) -> None:
        self.model = model
        self.kv = torch.zeros(model.kv_cache_shape(num_blocks, BLOCK_SIZE))
        self.next_block = 1

    def blocks(self, n_tokens: int) -> list[int]:
        n = -(-n_tokens // BLOCK_SIZE)
        table = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return table

    @torch.inference_mode()
    def step(self, chunks: list[SeqChunk], **pad) -> torch.Tensor:
        inputs = build_step_inputs(chunks, BLOCK_SIZE, **pad)
        logits, _ = self.model(*inputs.as_args(), self.kv)
        return logits[: len(chunks)]

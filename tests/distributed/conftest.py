"""A tiny random Llama saved as a Hugging Face directory (with SmolLM2's real tokenizer), so Ray
replicas and batch workers in other processes can load it by path in well under a second."""

from __future__ import annotations

import shutil

import pytest

from neuronserve.distributed import ray_available
from neuronserve.distributed.spec import EngineSpec

needs_ray = pytest.mark.skipif(
    not ray_available(), reason="Ray is not installed (pip install -e '.[distributed]')"
)


def save_tiny_model(path) -> str:
    """Write a 2-layer, 64-wide random Llama with SmolLM2's tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuronserve.model.loader import DEFAULT_MODEL, convert_gguf, resolve_model_path

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    source = convert_gguf(resolve_model_path(DEFAULT_MODEL))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir) -> EngineSpec:
    return EngineSpec(
        model=tiny_model_dir,
        served_model_name="tiny",
        max_model_len=1024,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        num_blocks=512,
        torch_threads=1,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every Ray test (starting one takes ~10 s): 4 logical CPUs on this
    small machine, so 2 replicas of 1 CPU, a gateway of 0 and Ray Data's tasks all fit."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()

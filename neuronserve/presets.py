"""Model shapes by name, for sizing without weights (fit checks, the simulator, compile plans).

The shapes are those of the published ``config.json`` files; no weights are involved.
"""

from __future__ import annotations

from neuronserve.config import ModelConfig

PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        rope_theta=500000.0, max_position_embeddings=131072,
    ),
    "llama-3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "llama-3-70b": dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
    ),
}  # fmt: skip


def preset(name: str) -> ModelConfig:
    """The ``ModelConfig`` of a preset name (case-insensitive)."""
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"model: no preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[key])


def param_count(config: ModelConfig) -> int:
    """Parameters of the unsharded model (embedding and LM head counted once when tied)."""
    h, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size + 2 * h
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return config.num_hidden_layers * per_layer + config.vocab_size * h + head + h

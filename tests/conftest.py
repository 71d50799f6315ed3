"""Fixtures shared across test directories."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (the embedded GGUF), its config and tokenizer, loaded once."""
    from neuronserve.model.loader import DEFAULT_MODEL, load_model
    from neuronserve.model.tokenizer import Tokenizer

    model, config, hf_dir = load_model(DEFAULT_MODEL)
    return model, config, Tokenizer.from_dir(hf_dir)

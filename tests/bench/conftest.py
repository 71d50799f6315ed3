import pytest

from neuronserve.model.loader import DEFAULT_MODEL, convert_gguf, resolve_model_path
from neuronserve.model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(convert_gguf(resolve_model_path(DEFAULT_MODEL)))

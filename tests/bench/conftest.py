import importlib.util
import sys
from pathlib import Path

import pytest

from neuronserve.model.loader import DEFAULT_MODEL, convert_gguf, resolve_model_path
from neuronserve.model.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(convert_gguf(resolve_model_path(DEFAULT_MODEL)))


BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, registered under its name (a script there may import
    another by name). Loaded from its file: putting benchmarks/ on sys.path would let its scripts
    shadow packages."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

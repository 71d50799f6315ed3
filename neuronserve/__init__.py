"""neuronserve: serve Llama-family models on AWS Inferentia2/Trainium, and the same code on CPU.

    from neuronserve import LLM, SamplingParams

Heavy parts (torch, transformers) load lazily, so ``import neuronserve.core`` needs no torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "LLM": "neuronserve.llm",
    "SamplingParams": "neuronserve.engine.params",
    "Engine": "neuronserve.engine.engine",
    "AsyncEngine": "neuronserve.engine.async_engine",
    "RequestOutput": "neuronserve.engine.outputs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""neuronserve: serve Llama-family models on AWS Inferentia2/Trainium, and the same code on CPU.

    from neuronserve import LLM, SamplingParams

Heavy parts (torch, transformers) load lazily, so ``import neuronserve.core`` needs no torch.
"""

from neuronserve._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "LLM": "neuronserve.llm",
    "SamplingParams": "neuronserve.engine.params",
    "Engine": "neuronserve.engine.engine",
    "AsyncEngine": "neuronserve.engine.async_engine",
    "RequestOutput": "neuronserve.engine.outputs",
    "SpeculativeConfig": "neuronserve.config",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY)

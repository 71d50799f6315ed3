"""The engine layer: ``Engine`` (add/abort/step), ``AsyncEngine`` (streams), the sampler and outputs.

``SamplingParams`` imports nothing heavy; the rest loads torch, so it is imported on first use.
"""

from neuronserve.engine.params import SamplingParams

_LAZY = {
    "Engine": "neuronserve.engine.engine",
    "AsyncEngine": "neuronserve.engine.async_engine",
    "RequestOutput": "neuronserve.engine.outputs",
    "CompletionOutput": "neuronserve.engine.outputs",
    "RequestMetrics": "neuronserve.engine.outputs",
    "TokenLogprobs": "neuronserve.engine.sampler",
}

__all__ = ["SamplingParams", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

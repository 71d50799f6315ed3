"""The engine layer: ``Engine`` (add/abort/step), ``AsyncEngine`` (streams), the sampler and outputs.

``SamplingParams`` imports nothing heavy; the rest loads torch, so it is imported on first use.
"""

from neuronserve._lazy import lazy_attributes
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


__getattr__ = lazy_attributes(__name__, _LAZY)

"""Backends: ``cpu`` (eager reference), ``cpu-traced`` (per-bucket static graphs on CPU) and
``neuron`` (per-bucket ``torch_neuronx.trace``; needs the Neuron SDK at run time)."""

from neuronserve.backends import cpu, neuron, traced  # noqa: F401  (they register themselves)
from neuronserve.backends.base import Backend, ModelRunner, available_backends, get_backend, register_backend

__all__ = ["Backend", "ModelRunner", "available_backends", "get_backend", "register_backend"]

"""Backends: ``cpu`` (eager reference); more register themselves here as they land."""

from neuronserve.backends import cpu  # noqa: F401  (registers "cpu")
from neuronserve.backends.base import Backend, ModelRunner, available_backends, get_backend, register_backend

__all__ = ["Backend", "ModelRunner", "available_backends", "get_backend", "register_backend"]

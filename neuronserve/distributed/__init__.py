"""Beyond one process: Ray Serve replicas with prefix-aware routing, and batch jobs on Ray Data.

Ray is an optional extra (``pip install -e ".[distributed]"``). Nothing outside this package imports
it, and inside it Ray is imported only where a Ray feature is used, so ``routing``, ``spec``,
``asgi`` and the in-process batch runner work without Ray. See ``docs/distributed.md``.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = "Ray is not installed: pip install -e '.[distributed]'"


def ray_available() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken or deliberately hidden install
        return False


def require_ray():
    """``import ray``, or a clear error naming the extra to install."""
    if not ray_available():
        raise ModuleNotFoundError(INSTALL_HINT)
    import ray

    return ray

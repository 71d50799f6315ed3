"""Tensor-parallel process groups: the collectives the parallel layers call.

``SINGLE`` is TP 1 (every collective is the identity), so the model code is the same at any degree.
``GlooGroup`` runs across processes on CPU. It is a group *object*, not torch.distributed's global
default group, so one process can open, close and reopen groups (a test suite, an ``LLM`` built
twice) and a program that already uses torch.distributed is not disturbed. On a Neuron host,
``neuronx_distributed`` sets up its own groups and collectives instead (see ``docs/neuron.md``).
"""

from __future__ import annotations

import datetime

import torch

DEFAULT_TIMEOUT_S = 120.0


class TPGroup:
    """A group of one: this process holds the whole model."""

    rank = 0
    size = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (in place where the backend allows)."""
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim``, in rank order."""
        return tensor

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


SINGLE = TPGroup()


def open_store(world_size: int, host: str = "127.0.0.1", timeout_s: float = DEFAULT_TIMEOUT_S):
    """Rank 0's rendezvous store on a free port (``store.port``); the other ranks connect to it."""
    import torch.distributed as dist

    return dist.TCPStore(
        host,
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


class GlooGroup(TPGroup):
    """A gloo group over TCP on CPU. Rank 0 passes the store from ``open_store``; the others pass the
    port. Construction returns once every rank has joined. A collective whose peer process died
    raises ``RuntimeError`` at once (the socket closes); one whose peer hangs raises after
    ``timeout_s``."""

    def __init__(
        self,
        rank: int,
        size: int,
        store=None,
        port: int | None = None,
        host: str = "127.0.0.1",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            if port is None:
                raise ValueError("port: a rank other than 0 needs the store's port")
            store = dist.TCPStore(host, port, size, is_master=False, timeout=timeout)
        self.rank, self.size = rank, size
        self._store = store
        self._pg = dist.ProcessGroupGloo(store, rank, size, timeout)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        self._pg.allreduce([tensor]).wait()
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        self._pg.allgather([parts], [tensor]).wait()
        return torch.cat(parts, dim=dim)

    def close(self) -> None:
        self._pg = None
        self._store = None

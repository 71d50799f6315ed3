"""Tensor parallelism across processes on one host: rank 0 is the engine's process, ranks 1..N-1
are spawned workers.

Each step, rank 0 sends the step's chunks (token ids, positions, block tables: a few KB) to every
worker over a pipe, then all ranks run the model on their shard, meeting at the layers' collectives
(gloo); the logits are gathered on every rank, and only rank 0's are used (it alone samples). The
scheduler, the sampler and the KV block bookkeeping live on rank 0 only; each worker holds its own
shard of the KV cache, addressed by the same block ids.

Failure handling: a worker that dies makes rank 0's next collective fail at once (its socket
closes), and the runner raises ``RunnerDeadError`` naming the rank and its exit code, after stopping
the other workers. Any other failure inside a step also ends the runner, because the ranks can no
longer be known to be in step. Workers exit when told to, when their pipe to rank 0 closes, or when
their parent process is gone (a watchdog thread), so no worker outlives the engine.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path

import torch

from neuronserve.backends.base import ModelRunner, RunnerDeadError
from neuronserve.backends.build import BuiltRank, ModelSpec, build_rank
from neuronserve.backends.inputs import check_token_ids, chunks_from_output
from neuronserve.core import SchedulerOutput
from neuronserve.parallel.group import DEFAULT_TIMEOUT_S, GlooGroup, open_store

logger = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 600.0  # loading a model per rank (GGUF conversion on a cold cache included)
MAIN_GUARD_HINT = (
    "the workers are spawned processes that import your script again, so the code that creates the "
    "LLM (or engine) must run only in the main process. Put it under a main guard:\n\n"
    '    if __name__ == "__main__":\n'
    "        main()\n"
)


def _main_script_unguarded() -> bool:
    """Whether ``__main__`` is a script file with no ``if __name__ == "__main__":`` in it (so a
    spawned worker, which imports it again, runs the whole script)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not str(path).endswith(".py"):
        return False  # python -c, an interactive session, a module run with -m: nothing re-runs
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return False
    for node in ast.walk(tree):
        names_main = isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
        if (
            names_main
            and node.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.comparators)
        ):
            return False
    return True


def threads_per_rank(tp_size: int) -> int:
    """CPU threads each rank computes with, so the ranks together use each core once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // tp_size)


class TensorParallelRunner(ModelRunner):
    """A ``ModelRunner`` over ``spec.tensor_parallel_size`` processes (this one is rank 0)."""

    def __init__(self, spec: ModelSpec, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.tp_size = spec.tensor_parallel_size
        if getattr(mp.current_process(), "_inheriting", False):
            # This is a worker importing the user's script again, which creates another engine.
            raise RuntimeError(
                f"tensor_parallel_size={self.tp_size} in a worker's import of the script: {MAIN_GUARD_HINT}"
            )
        if self.tp_size < 2:
            raise ValueError(f"tensor_parallel_size: a multi-process runner needs >= 2, got {self.tp_size}")
        self._dead: str | None = None
        self._threads = torch.get_num_threads()
        torch.set_num_threads(threads_per_rank(self.tp_size))
        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads and sockets
        store = open_store(self.tp_size, timeout_s=timeout_s)
        self._procs: list[mp.Process] = []
        self._conns = []
        for rank in range(1, self.tp_size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(spec, rank, store.port, theirs, os.getpid(), timeout_s),
                name=f"neuronserve-tp{rank}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._conns)
        try:
            self._wait_for("hello")
            self.group = GlooGroup(0, self.tp_size, store=store, timeout_s=timeout_s)
            built: BuiltRank = build_rank(spec, self.group)
            self._wait_for("ready")
        except BaseException:
            self.shutdown()
            raise
        self.local = built.runner
        self.model_config = built.model_config
        self.cache_config = built.cache_config
        self.model_dir = built.model_dir

    # ---------------------------------------------------------------- steps
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        if self._dead is not None:
            raise RunnerDeadError(self._dead)
        chunks = chunks_from_output(out)
        check_token_ids(chunks, self.model_config.vocab_size)  # before any rank starts the step
        try:
            for conn in self._conns:
                conn.send(("step", chunks))
            return self.local.run_chunks(chunks)
        except Exception as exc:
            self._dead = self._diagnose(exc)
            self.shutdown()
            raise RunnerDeadError(self._dead) from exc

    def _diagnose(self, exc: Exception) -> str:
        """Which worker ended the run, and how (waiting briefly for a dying worker's exit code)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and all(p.is_alive() for p in self._procs):
            time.sleep(0.05)
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
            message = _poll_error(conn)
            if message is not None:
                return f"tensor-parallel worker rank {rank} failed: {message}"
            if not proc.is_alive():
                return (
                    f"tensor-parallel worker rank {rank} (pid {proc.pid}) {_describe_exit(proc.exitcode)} "
                    "during a step; the engine cannot continue and must be restarted"
                )
        return f"a tensor-parallel step failed on rank 0 ({exc!r}); the ranks are out of step"

    # ---------------------------------------------------------------- lifecycle
    def _wait_for(self, what: str) -> None:
        """Wait until every worker reports ``what``; raise with a worker's error if one fails."""
        pending = dict(enumerate(self._conns, start=1))
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while pending:
            for rank, conn in list(pending.items()):
                proc = self._procs[rank - 1]
                if conn.poll(0.05):
                    try:
                        kind, payload = conn.recv()
                    except EOFError:
                        kind, payload = "error", self._silent_exit_reason()
                    if kind == "error":
                        raise RuntimeError(f"tensor-parallel worker rank {rank} failed to start: {payload}")
                    if kind == what:
                        del pending[rank]
                elif not proc.is_alive():
                    reason = self._silent_exit_reason(f"{_describe_exit(proc.exitcode)} while starting")
                    raise RuntimeError(f"tensor-parallel worker rank {rank} failed to start: {reason}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers {sorted(pending)} did not start in time")

    @staticmethod
    def _silent_exit_reason(default: str = "exited without a word") -> str:
        """Why a worker died before it could report: most often a script without a main guard."""
        return MAIN_GUARD_HINT if _main_script_unguarded() else default

    def shutdown(self) -> None:
        """Stop the workers (they finish their step first) and release the group. Idempotent."""
        self._finalizer()
        group = getattr(self, "group", None)
        if group is not None:
            group.close()
        torch.set_num_threads(self._threads)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]


def _poll_error(conn) -> str | None:
    with contextlib.suppress(EOFError, OSError):
        while conn.poll(0):
            kind, payload = conn.recv()
            if kind == "error":
                return payload
    return None


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _stop_workers(procs: list[mp.Process], conns: list) -> None:
    for conn in conns:
        with contextlib.suppress(OSError, ValueError):
            conn.send(("stop", None))
    for proc in procs:
        proc.join(timeout=5)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()


# ------------------------------------------------------------------ worker side
def _exit_with_parent(parent_pid: int) -> None:
    """Exit if the engine's process goes away without stopping us (killed, crashed)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_main(spec: ModelSpec, rank: int, port: int, conn, parent_pid: int, timeout_s: float) -> None:
    _exit_with_parent(parent_pid)
    torch.set_num_threads(threads_per_rank(spec.tensor_parallel_size))
    group = None
    try:
        conn.send(("hello", os.getpid()))
        group = GlooGroup(rank, spec.tensor_parallel_size, port=port, timeout_s=timeout_s)
        runner = build_rank(spec, group).runner
        conn.send(("ready", rank))
        while True:
            kind, payload = conn.recv()
            if kind == "stop":
                return
            runner.run_chunks(payload)
    except EOFError:  # rank 0 is gone
        return
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc(limit=8)))
        # Leave at once: rank 0 notices at its next collective, and waits for no one.
        os._exit(1)
    finally:
        if group is not None:
            group.close()

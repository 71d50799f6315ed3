"""Real uvicorn servers on 127.0.0.1 (free ports) in background threads, over SmolLM2-135M."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from neuronserve.backends import get_backend
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.engine.engine import Engine
from neuronserve.server.app import create_app

API_KEY = "test-key-123"


def engine_factory(smollm2, *, max_num_seqs=32, max_waiting=256, num_blocks=400, max_model_len=512):
    model, config, tokenizer = smollm2

    def load() -> Engine:
        sched = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=512,
            max_model_len=max_model_len,
            max_waiting=max_waiting,
        )
        cache = CacheConfig(block_size=16, num_blocks=num_blocks)
        runner = get_backend("cpu").build_runner(model, config, cache, sched)
        return Engine(runner, tokenizer, config, sched, cache)

    return load


class RunningServer:
    def __init__(self, app) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, wait_ready: bool = True) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        while wait_ready and httpx.get(self.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self) -> Engine:
        return self.app.state.neuronserve.engine.engine

    def wait_idle(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.engine.has_unfinished() or self.engine.num_unfinished:
            assert time.monotonic() < deadline, "the engine did not become idle"
            time.sleep(0.02)


@pytest.fixture(scope="session")
def server(smollm2):
    running = RunningServer(create_app(engine_factory(smollm2), "smollm2", api_key=API_KEY)).start()
    yield running
    running.stop()

"""The benchmark harness against live servers: a healthy one, and one that dies mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from neuronserve.bench import workloads
from neuronserve.bench.clients import OpenAIClient
from neuronserve.bench.sweep import sweep
from neuronserve.cli import main
from tests.server.conftest import API_KEY


def test_cli_bench_against_a_live_server(server, tmp_path):
    rc = main(
        ["bench", "--base-url", server.url, "--api-key", API_KEY, "--workload", "shopping",
         "--num-prompts", "6", "--output-len", "8", "--concurrency", "1,3", "--price-per-hour", "0.5",
         "--goodput", "ttft:30000", "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["target"] == server.url and [r["concurrency"] for r in data["runs"]] == [1, 3]
    for r in data["runs"]:
        assert (r["completed"], r["failed"], r["total_output_tokens"]) == (6, 0, 48)  # ignore_eos honoured
        assert r["total_input_tokens"] > 6 * 150  # shopping prompts carry product snippets
        assert r["p99_itl_ms"] > 0 and r["cost_per_million_output_tokens"] > 0 and r["output_goodput"] > 0
    assert "| 3 concurrent | 6 | 0 |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    server.wait_idle()


@pytest.mark.slow  # a SmolLM2 server process killed mid-run; run by make test-all
def test_failures_are_counted_and_a_dead_target_ends_the_run(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "neuronserve.cli", "serve", "--port", str(port), "--max-model-len", "1024",
           "--max-num-seqs", "4", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
            time.sleep(0.2)
        specs = workloads.fixed(24, input_len=16, output_len=150)
        specs[1].max_tokens = 10**6  # refused with a 400: a failure, counted

        async def run():
            async with OpenAIClient(url) as client:
                task = asyncio.ensure_future(sweep(client, specs, concurrencies=[4], progress=False))
                await asyncio.sleep(3.0)
                os.killpg(proc.pid, signal.SIGKILL)  # the target goes away mid-run
                return await asyncio.wait_for(task, timeout=60)

        started = time.monotonic()
        (result,) = asyncio.run(run())
        assert time.monotonic() - started < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert result["completed"] + result["failed"] == 24 and result["failed"] >= 20
    assert "unreachable" in result["stopped_early"]
    assert any(e.startswith("HTTP 400") for e in result["errors"])
    assert any("not sent" in e for e in result["errors"])

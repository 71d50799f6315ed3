"""``run-batch``: OpenAI batch lines in and out, per-line errors, and a kill + resume that neither
redoes nor loses a line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from neuronserve.distributed.batch import finished_keys, parse_requests, run_batch
from tests.distributed.conftest import needs_ray

REPO = Path(__file__).resolve().parents[2]


def request_line(i: int, max_tokens: int = 4) -> str:
    if i % 2:
        body = {"messages": [{"role": "user", "content": f"Question {i}: is it waterproof?"}]}
        url = "/v1/chat/completions"
    else:
        body, url = {"prompt": f"Product {i} is"}, "/v1/completions"
    body |= {"max_tokens": max_tokens, "temperature": 0}
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})


def write_input(path: Path, n: int, bad: bool = False) -> Path:
    lines = [request_line(i) for i in range(n)]
    if bad:
        lines += [
            "{not json",
            json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
            request_line(0),  # a repeated custom_id
            json.dumps({"custom_id": "bad-url", "url": "/v1/embeddings", "body": {}}),
            json.dumps(
                {"custom_id": "bad-field", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 7}}
            ),
            "",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_parse_checks_each_line_on_its_own():
    items = parse_requests(
        [
            request_line(1),
            "[]",
            json.dumps({"custom_id": "s", "url": "/v1/completions", "body": {"prompt": "x", "stream": True}}),
            request_line(1),
            "   ",
        ]
    )
    assert [i.error is None for i in items] == [True, False, False, False]
    assert "custom_id" in items[3].error and items[3].key == "line:4"
    assert "stream" in items[2].error


def test_bad_lines_get_errors_and_the_job_goes_on(tiny_spec, tmp_path):
    src, out = write_input(tmp_path / "in.jsonl", 6, bad=True), tmp_path / "out.jsonl"
    summary = run_batch(src, out, tiny_spec, backend="local", progress=False)
    records = read_output(out)
    assert summary.total == 11 and summary.succeeded == 6 and summary.failed == 5
    ok = {r["custom_id"]: r for r in records if r["error"] is None and r["response"]["status_code"] == 200}
    assert set(ok) == {f"req-{i}" for i in range(6)}
    chat = ok["req-1"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 4
    assert ok["req-0"]["response"]["body"]["object"] == "text_completion"
    assert ok["req-0"]["response"]["request_id"].startswith("cmpl-")
    refused = next(r for r in records if r["custom_id"] == "bad-field")
    assert (
        refused["response"]["status_code"] == 400 and refused["response"]["body"]["error"]["param"] == "top_p"
    )
    line_errors = sorted(r["line"] for r in records if r["error"] is not None)
    assert line_errors == [7, 8, 9, 10]
    # A rerun finds everything answered and does nothing.
    again = run_batch(src, out, tiny_spec, backend="local", progress=False)
    assert again.skipped == 11 and again.succeeded == again.failed == 0
    assert len(read_output(out)) == 11


def test_a_torn_last_line_is_rerun(tiny_spec, tmp_path):
    src, out = write_input(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    run_batch(src, out, tiny_spec, backend="local", progress=False)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 20])  # killed mid-write
    assert len(finished_keys(out)) == 2
    run_batch(src, out, tiny_spec, backend="local", progress=False)
    assert sorted(r["custom_id"] for r in read_output(out)) == ["req-0", "req-1", "req-2"]


def _run_cli(src: Path, out: Path, model: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "neuronserve.cli", "run-batch", "-i", str(src), "-o", str(out)]
    cmd += ["--model", model, "--max-model-len", "256", "--kv-cache-gb", "0.05", "--concurrency", "8"]
    cmd += ["--max-num-seqs", "8", "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow  # two batch processes of 200 lines; run by make test-all
def test_killed_halfway_then_resumed_answers_every_line_once(tiny_model_dir, tmp_path):
    src, out = write_input(tmp_path / "in.jsonl", 200), tmp_path / "out.jsonl"
    first = _run_cli(src, out, tiny_model_dir, "--executor", "local")
    deadline = time.monotonic() + 120
    while not out.exists() or len(out.read_bytes().splitlines()) < 100:
        assert first.poll() is None, first.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = len(finished_keys(out))
    assert 100 <= done_before < 200, f"killed after {done_before} lines: not halfway"

    second = _run_cli(src, out, tiny_model_dir, "--executor", "local")
    log = second.communicate(timeout=180)[0].decode()
    assert second.returncode == 0, log[-2000:]
    assert f"{done_before} already done" in log
    ids = Counter(r["custom_id"] for r in read_output(out))
    assert set(ids) == {f"req-{i}" for i in range(200)} and set(ids.values()) == {1}
    assert all(r["response"]["status_code"] == 200 for r in read_output(out))


@needs_ray
@pytest.mark.slow  # a Ray cluster (~10 s) and Ray Data's workers; run by make test-all
@pytest.mark.xdist_group("ray")  # the same worker, so the same Ray cluster, as test_serve
def test_ray_data_across_two_workers(ray_cluster, tiny_spec, tmp_path):
    src, out = write_input(tmp_path / "in.jsonl", 24, bad=True), tmp_path / "out.jsonl"
    summary = run_batch(
        src, out, tiny_spec, backend="ray", replicas=2, num_cpus_per_replica=1, progress=False
    )
    assert summary.succeeded == 24 and summary.failed == 5
    ids = Counter(r["custom_id"] for r in read_output(out) if r["error"] is None)
    assert len(ids) == 25 and set(ids.values()) == {1}  # 24 + the refused bad-field request
    with pytest.raises(ValueError, match="backend"):
        run_batch(src, out, tiny_spec, backend="spark")

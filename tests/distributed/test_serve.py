"""Two engine replicas on a local Ray cluster behind the gateway: the OpenAI API (official client),
prefix affinity, and a replica killed mid-load."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.distributed.conftest import needs_ray

# One Ray cluster per test process: under xdist every Ray test runs on the same worker. Slow (make
# test-all): the cluster and the two-replica service take ~50 s to start on 2 cores.
pytestmark = [needs_ray, pytest.mark.xdist_group("ray"), pytest.mark.slow]
SYSTEM = "You are the shopping assistant of an outdoor store. Recommend products and cite them. " * 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_spec):
    from neuronserve.distributed import serve as ray_serve
    from neuronserve.distributed.spec import ReplicaConfig

    port = free_port()
    config = ReplicaConfig(num_replicas=2, num_cpus=1, health_check_period_s=1, health_check_timeout_s=10)
    ray_serve.start(tiny_spec, config, port=port)
    yield f"http://127.0.0.1:{port}"
    from ray import serve

    serve.delete(ray_serve.APP_NAME)


def replica_stats(timeout: float = 90.0, avoid_pid: int | None = None) -> dict[str, dict]:
    """Stats of both live replicas (asked until two distinct ones answer)."""
    from neuronserve.distributed.serve import replica_handle

    handle, found = replica_handle(), {}
    deadline = time.monotonic() + timeout
    while len(found) < 2:
        assert time.monotonic() < deadline, f"only {len(found)} replicas answered"
        try:
            s = handle.stats.remote().result(timeout_s=10)
        except Exception:
            time.sleep(0.2)
            continue
        if s["pid"] != avoid_pid:
            found[s["replica_id"]] = s
    return found


def chat_body(question: str, max_tokens: int = 8, **extra) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}


def test_openai_api_through_the_gateway(service):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=service + "/v1", api_key="unused")
    full = client.chat.completions.create(**chat_body("Which tent is lightest?"))
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="tiny", prompt="A tent", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(**chat_body("x", top_p=5.0))
    assert "top_p" in str(err.value)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(service + "/health").json() == {"status": "ok"}


def test_a_shared_system_prompt_stays_on_one_replica_and_hits_its_cache(service):
    replicas, cached = set(), []
    for i in range(6):
        r = httpx.post(service + "/v1/chat/completions", json=chat_body(f"Question {i}?"), timeout=60)
        assert r.status_code == 200
        replicas.add(r.headers["x-neuronserve-replica"])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(replicas) == 1
    assert all(c >= 64 for c in cached[1:])  # the system prompt's blocks, from the second request on


def _one_request(url: str, i: int, results: list) -> None:
    stream = i % 2 == 0
    body = chat_body(f"Load {i}: what fits in a 30 l pack?", max_tokens=48, ignore_eos=True, stream=stream)
    body["messages"][0]["content"] = f"Tenant {i % 5}. " + SYSTEM  # spread over both replicas
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            text = r.read().decode()
            results.append((r.status_code, stream, text))
    except httpx.HTTPError as exc:  # a dropped connection is not a clean answer
        results.append((None, stream, repr(exc)))


def _is_clean(status: int | None, stream: bool, text: str) -> bool:
    """Completed, or a clean 5xx: OpenAI's error JSON (or, mid-stream, an error event)."""
    if status is None:
        return False
    if status >= 500:
        return "error" in json.loads(text)
    if status != 200:
        return False
    if not stream:
        return json.loads(text)["choices"][0]["finish_reason"] == "length"
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    if events[-1] != "[DONE]":
        return False
    payloads = [json.loads(e) for e in events[:-1]]
    finished = any(p.get("choices") and p["choices"][0].get("finish_reason") == "length" for p in payloads)
    return finished or "error" in payloads[-1]


def test_a_killed_replica_fails_cleanly_and_the_service_heals(service):
    before = replica_stats()
    victim = next(iter(before.values()))["pid"]
    results: list = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = worker
        while not stop.is_set():
            _one_request(service, i, results)
            i += 8

    workers = [threading.Thread(target=load, args=(w,)) for w in range(8)]
    for w in workers:
        w.start()
    time.sleep(2.0)  # both replicas busy
    in_flight_at_kill = len(results)
    os.kill(victim, signal.SIGKILL)
    time.sleep(3.0)  # load goes on against the surviving replica
    stop.set()
    for w in workers:
        w.join(timeout=120)
    print(
        f"{len(results)} requests: {sum(s == 200 for s, _, _ in results)} answered 200 "
        f"({sum('error' in t for s, _, t in results if s == 200)} with an error event), "
        f"{sum(s is not None and s >= 500 for s, _, _ in results)} 5xx"
    )
    unclean = [r for r in results if not _is_clean(*r)]
    assert not unclean, unclean[:3]
    after_kill = results[in_flight_at_kill:]
    assert sum(status == 200 for status, _, _ in after_kill) >= len(after_kill) // 2, "new requests failed"

    # Ray replaces the replica: two live replicas again, neither of them the killed process.
    healed = replica_stats(timeout=120, avoid_pid=victim)
    assert victim not in {s["pid"] for s in healed.values()}
    for i in range(4):
        r = httpx.post(service + "/v1/chat/completions", json=chat_body(f"after {i}"), timeout=60)
        assert r.status_code == 200

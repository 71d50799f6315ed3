"""The server through the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.server.app import create_app
from tests.server.conftest import API_KEY, RunningServer, engine_factory

QUESTION = [{"role": "user", "content": "Is a cast iron pan dishwasher safe?"}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def test_chat_streamed_equals_non_streamed(client, server):
    full = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert full.object == "chat.completion" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.total_tokens > full.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=QUESTION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text and len(text) > 20
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    server.wait_idle()


def test_completions_models_logprobs_and_stop(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    prompt = "The three best features of a good blender are"
    full = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
    choice = full.choices[0]
    assert len(choice.logprobs.tokens) == full.usage.completion_tokens == 16
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    streamed = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    word = choice.text.split()[2]
    stopped = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stop=[word]
    )
    assert stopped.choices[0].text == choice.text[: choice.text.index(word)]
    assert stopped.choices[0].finish_reason == "stop"
    seeded = [
        client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=1.0, seed=5)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    chat = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_completion_tokens=5, logprobs=True, top_logprobs=3
    )
    assert chat.usage.completion_tokens == 5 and len(chat.choices[0].logprobs.content) == 5
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3


def test_sse_framing(server):
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")
    assert events[-1] == ""
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        assert json.loads(event[len("data: ") :])["object"] == "chat.completion.chunk"


def test_32_concurrent_streams_complete(server):
    prompts = [f"List {i % 5 + 2} things to check when buying product number {i}:" for i in range(32)]

    async def one(client, prompt):
        stream = await client.completions.create(
            model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        parts, reasons = [], []
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(parts), reasons[-1]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        streamed = await asyncio.gather(*(one(client, p) for p in prompts))
        full = await asyncio.gather(
            *(
                client.completions.create(model="smollm2", prompt=p, max_tokens=12, temperature=0)
                for p in prompts
            )
        )
        return streamed, full

    streamed, full = asyncio.run(main())
    assert all(reason == "length" for _, reason in streamed)
    assert [text for text, _ in streamed] == [f.choices[0].text for f in full]
    server.wait_idle()
    server.engine.scheduler.block_manager.check_integrity()


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/chat/completions", "{not json", 400, None),
        ("/v1/chat/completions", {"model": "smollm2"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": QUESTION, "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": QUESTION, "temperature": 1e9}, 400, "temperature"),
        ("/v1/chat/completions", {"messages": QUESTION, "top_k": -5}, 400, "top_k"),
        ("/v1/chat/completions", {"messages": QUESTION, "min_p": 1.5}, 400, "min_p"),
        ("/v1/chat/completions", {"messages": QUESTION, "presence_penalty": 3}, 400, "presence_penalty"),
        ("/v1/chat/completions", {"messages": QUESTION, "frequency_penalty": -3}, 400, "frequency_penalty"),
        ("/v1/chat/completions", {"messages": QUESTION, "repetition_penalty": 0}, 400, "repetition_penalty"),
        ("/v1/chat/completions", {"messages": QUESTION, "top_p": 0}, 400, "top_p"),
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": QUESTION, "n": 3}, 400, "n"),
        ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 3}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"messages": QUESTION, "model": "gpt-9"}, 404, "model"),
        ("/v1/completions", {"prompt": "word " * 2000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": None}, 200, None),  # a valid control
        ("/v1/completions", {"prompt": [1, 2, 99999999]}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"prompt": []}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
        ("/v1/completions", [1, 2, 3], 400, None),
        ("/v1/nothing", {}, 404, None),
    ],
)
def test_malformed_requests_get_4xx_and_the_server_stays_healthy(server, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(server.url + path, content=content, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    if status != 200:
        error = r.json()["error"]
        assert error["message"] and "Traceback" not in r.text and error["type"]
        assert error["param"] == param or (param and error["param"].startswith(param)), error
    assert httpx.get(server.url + "/health").status_code == 200
    server.wait_idle()


def test_prompt_too_long_says_the_numbers(server):
    r = httpx.post(
        server.url + "/v1/completions",
        json={"prompt": "word " * 600, "max_tokens": 10},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert re.search(r"the prompt's 60\d tokens \+ max_tokens=10 exceed max_model_len=512", message), message


def test_api_keys(server):
    url = server.url + "/v1/models"
    assert httpx.get(url).status_code == 401
    assert (
        httpx.get(url, headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == "invalid_api_key"
    )
    assert httpx.get(url, headers={"Authorization": API_KEY}).status_code == 401  # no scheme
    assert httpx.get(url, headers=AUTH).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key


def test_disconnect_mid_stream_frees_the_blocks(server):
    body = {
        "prompt": "Write a long story about a blender.",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 5:
                break
    assert server.engine.num_unfinished <= 1
    server.wait_idle(timeout=5)  # 400 tokens take over 10 s here: idle this soon means aborted
    bm = server.engine.scheduler.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_usable_blocks


def scrape(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_metrics_parse_and_move(client, server):
    before = scrape(server)
    assert "neuronserve:num_requests_running" in before and "neuronserve:kv_cache_usage_perc" in before
    client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=6, temperature=0)
    client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=6, temperature=0)
    after = scrape(server)
    for name in ("generation_tokens_total", "prompt_tokens_total", "time_to_first_token_seconds_count"):
        assert after["neuronserve:" + name] > before.get("neuronserve:" + name, 0), name
    assert (
        after["neuronserve:generation_tokens_total"] - before.get("neuronserve:generation_tokens_total", 0)
        == 12
    )
    assert after["neuronserve:prefix_cache_hits_total"] > before.get("neuronserve:prefix_cache_hits_total", 0)
    assert after["neuronserve:inter_token_latency_seconds_count"] >= 10
    assert after["neuronserve:e2e_request_latency_seconds_count"] >= 2


def test_overload_gets_429_with_retry_after_and_admitted_requests_finish(smollm2):
    app = create_app(engine_factory(smollm2, max_num_seqs=2, max_waiting=2, num_blocks=80), "smollm2")
    running = RunningServer(app).start()
    try:

        async def one(client, i):
            r = await client.post(
                "/v1/completions", json={"prompt": f"Item {i}:", "max_tokens": 24, "ignore_eos": True}
            )
            return r

        async def burst():
            async with httpx.AsyncClient(base_url=running.url, timeout=120) as client:
                return await asyncio.gather(*(one(client, i) for i in range(16)))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2
        for r in responses:
            if r.status_code == 429:
                assert (
                    int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded"
                )
            else:
                assert r.json()["usage"]["completion_tokens"] == 24
        families = text_string_to_metric_families(httpx.get(running.url + "/metrics").text)
        rejected = [s for f in families for s in f.samples if s.name == "neuronserve:request_rejected_total"]
        assert [(s.labels, s.value) for s in rejected] == [({"status": "429"}, codes.count(429))]
        assert httpx.get(running.url + "/health").status_code == 200
        running.wait_idle()
    finally:
        running.stop()


def test_503_while_the_model_loads(smollm2):
    release = threading.Event()
    load = engine_factory(smollm2, num_blocks=40)

    def slow_load():
        release.wait(30)
        return load()

    running = RunningServer(create_app(slow_load, "smollm2")).start(wait_ready=False)
    try:
        r = httpx.get(running.url + "/health")
        assert (
            r.status_code == 503 and "loading" in r.json()["error"]["message"] and "Retry-After" in r.headers
        )
        assert httpx.post(running.url + "/v1/completions", json={"prompt": "hi"}).status_code == 503
        metrics = httpx.get(running.url + "/metrics")
        assert metrics.status_code == 200
        assert 'neuronserve:request_rejected_total{status="503"} 1.0' in metrics.text  # /health not counted
        release.set()
        for _ in range(200):
            if httpx.get(running.url + "/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        r = httpx.post(running.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        running.stop()

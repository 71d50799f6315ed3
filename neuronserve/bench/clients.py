"""Benchmark clients: the in-process engine and any OpenAI-compatible server, one interface.

``send(spec)`` streams one request and returns a ``RequestRecord`` (a failure is recorded, never
raised). Both clients ask for exactly ``max_tokens`` tokens (``ignore_eos``) at temperature 0 by
default, so servers are compared on the same amount of work.
"""

from __future__ import annotations

import json
import time

from neuronserve.bench.metrics import RequestRecord
from neuronserve.bench.workloads import RequestSpec


class TargetUnreachable(Exception):
    """The target refused a connection: it is not (or no longer) there."""


class EngineClient:
    """Sends requests to an in-process ``AsyncEngine``."""

    name = "neuronserve (in-process)"

    def __init__(self, engine, ignore_eos: bool = True, temperature: float = 0.0) -> None:
        self.engine = engine
        self.ignore_eos = ignore_eos
        self.temperature = temperature

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    async def send(self, spec: RequestSpec) -> RequestRecord:
        from neuronserve.engine.params import SamplingParams

        record = RequestRecord(sent=time.perf_counter())
        try:
            tokenizer = self.engine.engine.tokenizer
            prompt = tokenizer.apply_chat_template(spec.messages) if spec.is_chat else spec.prompt
            params = SamplingParams(
                max_tokens=spec.max_tokens, temperature=self.temperature, ignore_eos=self.ignore_eos
            )
            last = None
            async for out in self.engine.generate(prompt, params):
                if out.outputs[0].delta_token_ids:
                    record.chunk_times.append(time.perf_counter())
                last = out
            record.done = time.perf_counter()
            record.prompt_tokens = len(last.prompt_token_ids)
            record.output_tokens = len(last.outputs[0].token_ids)
            record.ok = last.finished and last.outputs[0].finish_reason != "abort"
            if not record.ok:
                record.error = f"finished with {last.outputs[0].finish_reason}"
        except Exception as exc:  # recorded as a failure; the benchmark goes on
            record.done = time.perf_counter()
            record.error = f"{type(exc).__name__}: {exc}"
        return record


class OpenAIClient:
    """Streams requests to an OpenAI-compatible server (neuronserve, llama.cpp, vLLM)."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        ignore_eos: bool = True,
        temperature: float = 0.0,
        timeout_s: float = 600.0,
        name: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.ignore_eos = ignore_eos
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.name = name or self.base_url
        self.http = None

    async def __aenter__(self) -> OpenAIClient:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(self.timeout_s, connect=10.0)
        self.http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout, limits=limits
        )
        if self.model is None:
            try:
                models = (await self.http.get("/v1/models")).json()
                self.model = models["data"][0]["id"]
            except Exception as exc:
                await self.http.aclose()
                raise TargetUnreachable(f"{self.base_url}: cannot list models ({exc})") from None
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def send(self, spec: RequestSpec) -> RequestRecord:
        import httpx

        body = {
            "model": self.model,
            "max_tokens": spec.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if spec.is_chat:
            path, body["messages"] = "/v1/chat/completions", spec.messages
        else:
            path, body["prompt"] = "/v1/completions", spec.prompt
        record = RequestRecord(sent=time.perf_counter())
        num_chunks, usage = 0, None
        try:
            async with self.http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    record.error = f"HTTP {response.status_code}: {_error_message(text)}"
                    record.done = time.perf_counter()
                    return record
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise RuntimeError(_error_message(data))
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        text = choice.get("text") or (choice.get("delta") or {}).get("content")
                        if text:
                            record.chunk_times.append(time.perf_counter())
                            num_chunks += 1
            record.done = time.perf_counter()
            if usage:
                record.prompt_tokens = usage.get("prompt_tokens", 0)
                record.output_tokens = usage.get("completion_tokens", num_chunks)
            else:  # a server without usage in streams: one chunk is about one token
                record.output_tokens = num_chunks
            record.ok = num_chunks > 0
            if not record.ok:
                record.error = "the stream carried no text"
        except httpx.ConnectError as exc:
            record.done = time.perf_counter()
            record.error = f"connection refused: {exc}"
            raise TargetUnreachable(record.error) from None
        except Exception as exc:  # a dropped connection, bad JSON, a server-side error event
            record.done = time.perf_counter()
            record.error = f"{type(exc).__name__}: {exc}"
        return record


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except Exception:
        return text[:200]

"""Prefix-aware vs round-robin routing over 2 Ray Serve replicas: prefix-cache hit rate and TTFT.

    python benchmarks/distributed_routing.py            # SmolLM2-135M, ~3 minutes on 2 cores
    python benchmarks/distributed_routing.py --conversations 8 --turns 2   # quicker

The workload is the shopping assistant's: conversations under one of a few stores' system prompts,
each with its own retrieved products (the catalog's, via BM25) and several turns; a turn is sent
when the previous one's answer has arrived, with that answer in the history, so later turns share
everything before them with earlier ones. ``--concurrency`` conversations run at once.

Per policy, the same requests go through a fresh deployment (empty caches) of 2 replicas; the
client streams each answer (``include_usage``) and records the time to the first content chunk
(TTFT) and the usage's ``prompt_tokens_details.cached_tokens``. The hit rate is cached prompt tokens
over all prompt tokens; the replicas' own scheduler counters are reported beside it. Writes
``benchmarks/results/distributed_routing.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.shopping_assistant.prompt import SYSTEM_PROMPT, build_messages  # noqa: E402
from examples.shopping_assistant.retrieval import Retriever, load_catalog  # noqa: E402

STORES = ["Northface Outfitters", "Kitchen Corner", "Trailhead Running"]
QUESTIONS = [
    "Which one would you recommend for a beginner?",
    "Is there anything cheaper that is still well reviewed?",
    "What do the reviews complain about?",
    "Which is the best value for the money?",
]
FOLLOW_UPS = ["Why that one?", "And how does it compare to the others?", "Would you buy it again?"]
TOPICS = ["tent", "running shoes", "blender", "coffee grinder", "headphones", "backpack", "cast iron pan"]


def conversations(n: int, seed: int) -> list[dict]:
    """Each conversation: a store's system prompt, its retrieved products and first question."""
    rng = random.Random(seed)
    retriever = Retriever(load_catalog())
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        messages = build_messages(rng.choice(QUESTIONS), retriever.search(topic, k=3))
        store = STORES[i % len(STORES)]
        messages[0]["content"] = f"You work for {store}. {SYSTEM_PROMPT}"
        out.append({"messages": messages})
    return out


async def run_conversation(client, url, conv, turns, max_tokens, records) -> None:
    messages = list(conv["messages"])
    for turn in range(turns):
        body = {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent, ttft, text, usage = time.perf_counter(), None, [], None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            replica = r.headers.get("x-neuronserve-replica")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {}).get("content")
                    if delta:
                        ttft = ttft if ttft is not None else time.perf_counter() - sent
                        text.append(delta)
        records.append(
            {
                "turn": turn,
                "replica": replica,
                "ttft_s": ttft,
                "prompt_tokens": usage["prompt_tokens"],
                "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            }
        )
        messages = [*messages, {"role": "assistant", "content": "".join(text)}]
        messages.append({"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]})


async def drive(url, convs, turns, max_tokens, concurrency) -> list[dict]:
    records: list[dict] = []
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(conv):
            async with limit:
                await run_conversation(client, url, conv, turns, max_tokens, records)

        await asyncio.gather(*(one(c) for c in convs))
    return records


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def measure(policy: str, spec, args) -> dict:
    from ray import serve

    from neuronserve.distributed import serve as ray_serve
    from neuronserve.distributed.spec import ReplicaConfig

    config = ReplicaConfig(num_replicas=2, num_cpus=1, routing=policy)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_serve.start(spec, config, port=port)
    url = f"http://127.0.0.1:{port}"
    try:
        warm = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=300)
        warm.raise_for_status()
        started = time.perf_counter()
        records = asyncio.run(
            drive(
                url,
                conversations(args.conversations, args.seed),
                args.turns,
                args.max_tokens,
                args.concurrency,
            )
        )
        wall = time.perf_counter() - started
        stats = replica_counters()
    finally:
        serve.delete(ray_serve.APP_NAME)
        serve.shutdown()  # the next policy's proxy binds another port
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    return {
        "policy": policy,
        "requests": len(records),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt,
        "replica_hit_rate": sum(s["prefix_cache_hits"] for s in stats)
        / sum(s["prefix_cache_queries"] for s in stats),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_mean_s": statistics.fmean(ttfts),
        "wall_s": wall,
        "requests_per_replica": {
            r: sum(x["replica"] == r for x in records) for r in {x["replica"] for x in records}
        },
    }


def replica_counters() -> list[dict]:
    from neuronserve.distributed.serve import replica_handle

    handle, found = replica_handle(), {}
    for _ in range(40):
        s = handle.stats.remote().result(timeout_s=30)
        found[s["replica_id"]] = s
        if len(found) == 2:
            break
    return list(found.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="conversations in flight")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/distributed_routing.json"))
    args = parser.parse_args()

    import ray

    from neuronserve.distributed.spec import EngineSpec

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    spec = EngineSpec(model=args.model, max_model_len=2048, max_num_seqs=8, kv_cache_gb=0.5, torch_threads=1)
    rows = [measure(policy, spec, args) for policy in ("prefix", "round_robin")]
    ray.shutdown()

    print(
        f"\n{args.conversations} conversations x {args.turns} turns, {args.concurrency} at once, "
        f"2 replicas, {args.model}"
    )
    header = [
        "policy",
        "requests",
        "prompt tokens",
        "hit rate (usage)",
        "hit rate (replicas)",
        "TTFT p50",
        "TTFT p99",
    ]
    print("| " + " | ".join(header) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['policy']} | {r['requests']} | {r['prompt_tokens']} | {r['hit_rate']:.1%} | "
            f"{r['replica_hit_rate']:.1%} | {r['ttft_p50_s'] * 1e3:.0f} ms | "
            f"{r['ttft_p99_s'] * 1e3:.0f} ms |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "distributed_routing",
        "model": args.model,
        "workload": vars(args) | {"replicas": 2, "stores": len(STORES)},
        "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "note": "2 replicas with 1 torch thread each on one small shared machine; TTFT includes queueing",
        "runs": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The README's main job: shopping questions answered by the embedded model on CPU.

Until the engine lands (its own issue), this drives the pieces directly: the continuous-batching
scheduler, the CPU backend running SmolLM2-135M-Instruct, and the incremental detokenizer; greedy
decoding. It prints each answer and the measured throughput.
"""

from __future__ import annotations

import time

from neuronserve.backends import get_backend
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.core import Request, Scheduler
from neuronserve.model.loader import DEFAULT_MODEL, load_model
from neuronserve.model.tokenizer import IncrementalDetokenizer, Tokenizer

SYSTEM = "You are a helpful shopping assistant. Answer briefly and concretely."
QUESTIONS = [
    "What should I look for in running shoes for flat feet?",
    "Is a cast iron pan dishwasher safe?",
    "Which is better for a small apartment, a robot vacuum or a stick vacuum?",
    "How many watts does a blender need to crush ice?",
    "What size backpack do I need for a weekend hike?",
    "Are noise-cancelling headphones worth it for commuting?",
]
MAX_TOKENS = 64


def main() -> None:
    t0 = time.perf_counter()
    model, config, hf_dir = load_model(DEFAULT_MODEL)
    tokenizer = Tokenizer.from_dir(hf_dir)
    print(f"loaded {DEFAULT_MODEL} ({config.num_hidden_layers} layers) in {time.perf_counter() - t0:.1f} s")

    sched_cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512)
    cache_cfg = CacheConfig(block_size=16, num_blocks=256, enable_prefix_caching=True)
    scheduler = Scheduler(sched_cfg, cache_cfg)
    runner = get_backend("cpu").build_runner(model, config, cache_cfg, sched_cfg)
    detokenizers = {}
    for i, question in enumerate(QUESTIONS):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages)
        scheduler.add_request(
            Request(str(i), ids, max_tokens=MAX_TOKENS, eos_token_id=tokenizer.eos_token_id)
        )
        detokenizers[str(i)] = IncrementalDetokenizer(tokenizer, ids)

    t0, steps, generated, first_token_at = time.perf_counter(), 0, 0, None
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        tokens = runner.execute(out).argmax(-1).tolist()
        for i, request in enumerate(out.requests):
            if out.samples(i):
                detokenizers[request.request_id].add(tokens[i])
                generated += 1
                first_token_at = first_token_at or time.perf_counter() - t0
        scheduler.update(out, tokens)
        steps += 1
    elapsed = time.perf_counter() - t0

    for i, question in enumerate(QUESTIONS):
        print(f"\nQ: {question}\nA: {detokenizers[str(i)].text.strip()}")
    stats = scheduler.stats()
    print(
        f"\n{len(QUESTIONS)} requests, {generated} tokens in {elapsed:.1f} s on CPU: "
        f"{generated / elapsed:.1f} output tok/s over {steps} steps; "
        f"first token after {first_token_at:.2f} s; "
        f"prefix cache reused {stats.prefix_cache_hits} of {stats.prefix_cache_queries} prompt tokens"
    )


if __name__ == "__main__":
    main()

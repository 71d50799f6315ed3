"""The README's main job: a short demo of what neuronserve does today.

Runs a shopping-assistant-shaped workload (a shared system prompt, varied questions) through the
continuous-batching scheduler with a stand-in "model" that samples fixed tokens, and prints what a
serving engineer watches: batch composition per step, prefix-cache hits, preemptions, KV usage.
"""

from __future__ import annotations

import random
import time

from neuronserve.core import CacheConfig, Request, Scheduler, SchedulerConfig


def main() -> None:
    rng = random.Random(0)
    system_prompt = [rng.randrange(100, 49000) for _ in range(96)]
    s = Scheduler(
        SchedulerConfig(
            max_num_seqs=16,
            max_num_batched_tokens=128,
            max_model_len=512,
            token_buckets=(16, 32, 64, 128),
        ),
        CacheConfig(block_size=16, num_blocks=64),
    )
    for i in range(24):
        question = [rng.randrange(100, 49000) for _ in range(rng.randint(8, 60))]
        s.add_request(
            Request(
                f"q{i}",
                system_prompt + question,
                max_tokens=rng.randint(16, 64),
                priority=0 if i % 6 else 1,
            )
        )
    print("step  bucket  prefill+decode tokens  running  waiting  KV used")
    t0, steps, finished = time.perf_counter(), 0, 0
    while s.has_unfinished():
        out = s.schedule()
        decode = sum(1 for n in out.num_new_tokens if n == 1)
        sampled = [rng.randrange(100, 49000) for _ in out.requests]
        finished += len(s.update(out, sampled))
        steps += 1
        if steps % 8 == 1:
            st = s.stats()
            print(
                f"{steps:>4}  {out.bucket:>6}  {out.num_scheduled_tokens - decode:>7} + {decode:<12}"
                f"{st.num_running:>8}  {st.num_waiting:>7}  {st.kv_cache_usage:>6.0%}"
            )
        s.block_manager.check_integrity()
    st = s.stats()
    elapsed = time.perf_counter() - t0
    print(f"\n{finished} requests in {steps} steps ({elapsed * 1e6 / steps:.0f} µs of scheduling per step)")
    print(
        f"prefix cache: {st.prefix_cache_hits} of {st.prefix_cache_queries} prompt tokens reused "
        f"({st.prefix_cache_hits / st.prefix_cache_queries:.0%}); preemptions: {st.num_preemptions}"
    )


if __name__ == "__main__":
    main()

"""The README's main job: shopping questions answered by the embedded model through ``LLM.chat``.

Prints each answer and the measured throughput (output tokens per second of wall time, all
questions batched together by the continuous-batching engine on CPU).
"""

from __future__ import annotations

import statistics
import time

from neuronserve import LLM, SamplingParams
from neuronserve.bench.prompts import shopping_conversations

NUM_QUESTIONS = 8
MAX_TOKENS = 96


def main() -> None:
    t0 = time.perf_counter()
    llm = LLM(max_num_seqs=NUM_QUESTIONS, max_model_len=1024, kv_cache_gb=0.25)
    print(
        f"loaded {llm.engine.model_config.num_hidden_layers}-layer model in {time.perf_counter() - t0:.1f} s"
    )

    conversations = shopping_conversations(NUM_QUESTIONS)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, repetition_penalty=1.1)
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, params)
    elapsed = time.perf_counter() - t0

    for conversation, out in zip(conversations, outputs):
        print(f"\nQ: {conversation[-1]['content']}\nA: {out.outputs[0].text.strip()}")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    ttft = statistics.median(o.metrics.time_to_first_token for o in outputs)
    print(
        f"\n{len(outputs)} questions, {num_tokens} output tokens in {elapsed:.1f} s on CPU: "
        f"{num_tokens / elapsed:.1f} output tok/s; median time to first token {ttft:.2f} s"
    )


if __name__ == "__main__":
    main()

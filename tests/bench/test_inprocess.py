"""The harness end to end against the in-process engine (a tiny random Llama, real tokenizer)."""

import asyncio
import math

import torch

from neuronserve.bench import workloads
from neuronserve.bench.clients import EngineClient
from neuronserve.bench.sweep import sweep
from neuronserve.engine.async_engine import AsyncEngine
from neuronserve.model.llama import LlamaForCausalLM
from tests.engine.conftest import assert_all_blocks_free, make_engine, tiny_config


def test_sweep_over_concurrency_against_the_engine(tokenizer):
    torch.manual_seed(0)
    engine = make_engine(LlamaForCausalLM(tiny_config()).eval(), tokenizer, max_model_len=128, max_num_seqs=8)
    specs = workloads.fixed(12, input_len=20, output_len=8, tokenizer=tokenizer)

    async def main():
        async with EngineClient(AsyncEngine(engine)) as client:
            return await sweep(
                client, specs, concurrencies=[1, 4], slos={"ttft": 60_000}, price_per_hour=1.0, progress=False
            )

    runs = asyncio.run(main())
    assert [r["concurrency"] for r in runs] == [1, 4]
    for r in runs:
        assert (r["completed"], r["failed"], r["total_output_tokens"]) == (12, 0, 96)
        assert r["total_input_tokens"] == sum(len(tokenizer.encode(s.prompt)) for s in specs)
        assert r["output_throughput"] > 0 and r["request_goodput"] == r["request_throughput"]
        assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] and r["mean_tpot_ms"] > 0
        assert math.isclose(r["cost_per_million_output_tokens"], 1e6 / (3600 * r["output_throughput"]))
        assert len(r["ttfts_ms"]) == 12 and r["stopped_early"] is None
    assert_all_blocks_free(engine)

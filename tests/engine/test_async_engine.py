"""AsyncEngine: concurrent streams, cancellation and failures, on a tiny model."""

import asyncio

import pytest

from neuronserve import SamplingParams
from neuronserve.engine.async_engine import AsyncEngine
from tests.engine.conftest import ScriptedRunner, assert_all_blocks_free, make_engine
from tests.engine.test_engine import make_prompts

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


async def collect(engine: AsyncEngine, prompt, params, request_id):
    return [out async for out in engine.generate(prompt, params, request_id=request_id)]


async def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    async def idle():
        while engine.engine.has_unfinished():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(idle(), timeout)


def test_concurrent_streams_equal_the_synchronous_engine(tiny_model, tokenizer):
    prompts = make_prompts(6, seed=3)
    sync = make_engine(tiny_model, tokenizer)
    expected = {}
    for i, p in enumerate(prompts):
        sync.add_request(p, PARAMS, request_id=str(i))
    while sync.has_unfinished():
        for out in sync.step():
            if out.finished:
                expected[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].text)

    async def main():
        engine = AsyncEngine(make_engine(tiny_model, tokenizer))
        streams = await asyncio.gather(*(collect(engine, p, PARAMS, str(i)) for i, p in enumerate(prompts)))
        await engine.shutdown()
        return engine, streams

    engine, streams = asyncio.run(main())
    for i, outs in enumerate(streams):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        final = outs[-1].outputs[0]
        assert (final.token_ids, final.text) == expected[str(i)]
        assert "".join(o.outputs[0].delta_text for o in outs) == final.text
    assert_all_blocks_free(engine.engine)


def test_cancelling_a_consumer_aborts_its_request_and_frees_its_blocks(tiny_model):
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

    async def main():
        engine = AsyncEngine(make_engine(tiny_model, max_model_len=128))
        seen = []

        async def consume():
            async for out in engine.generate(list(range(10, 30)), long, request_id="c"):
                seen.append(out)

        task = asyncio.create_task(consume())
        other = asyncio.create_task(collect(engine, list(range(40, 50)), PARAMS, "o"))
        while len(seen) < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        others = await other
        await wait_idle(engine)
        await engine.shutdown()
        return engine, seen, others

    engine, seen, others = asyncio.run(main())
    assert 3 <= len(seen[-1].outputs[0].token_ids) < 100
    assert others[-1].finished and len(others[-1].outputs[0].token_ids) == 12
    assert "c" not in engine.engine.scheduler.requests
    assert_all_blocks_free(engine.engine)


def test_breaking_out_of_a_stream_aborts_it(tiny_model):
    async def main():
        engine = AsyncEngine(make_engine(tiny_model))
        stream = engine.generate(list(range(5, 20)), SamplingParams(max_tokens=50, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        await wait_idle(engine)
        await engine.shutdown()
        return engine

    engine = asyncio.run(main())
    assert engine.engine.num_unfinished == 0
    assert_all_blocks_free(engine.engine)


def test_bad_input_raises_at_once_and_a_failing_step_fails_only_its_requests(tokenizer):
    class Exploding(ScriptedRunner):
        def execute(self, out):
            if "boom" in out.request_ids:
                raise RuntimeError("device fault")
            return super().execute(out)

    ids = tokenizer.encode("fine answer here", add_special_tokens=False)

    async def main():
        engine = AsyncEngine(make_engine(Exploding({"boom": ids, "ok": ids}), tokenizer))
        with pytest.raises(ValueError, match="^temperature"):
            await collect(engine, "x", SamplingParams(temperature=-1), "bad")
        with pytest.raises(ValueError, match="^prompt_token_ids: the prompt is empty"):
            engine.add_request([], PARAMS)
        with pytest.raises(RuntimeError, match="device fault"):
            await collect(engine, "hi", PARAMS, "boom")
        ok = await collect(engine, "hi", SamplingParams(max_tokens=3), "ok")
        assert engine.is_running
        await engine.shutdown()
        return engine, ok

    engine, ok = asyncio.run(main())
    assert ok[-1].outputs[0].text == "fine answer here"
    assert_all_blocks_free(engine.engine)

"""The multi-process engine: TP 2 generates what TP 1 does, on a tiny model and on SmolLM2; a
worker that dies ends the engine with a clear error; no worker outlives its engine."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from neuronserve.backends.base import RunnerDeadError
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.engine.async_engine import AsyncEngine, EngineDeadError
from neuronserve.engine.engine import Engine
from neuronserve.engine.params import SamplingParams
from neuronserve.llm import LLM
from neuronserve.model.loader import DEFAULT_MODEL, convert_gguf, resolve_model_path

PROMPTS = [
    "Is a cast iron pan dishwasher safe?",
    "Which blender crushes ice best?",
    "Hi",
    "Compare two kettles.",
]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and its 9 query / 3 KV head grouping."""
    torch.manual_seed(0)
    hf = HFLlama(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=72,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=9,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            max_position_embeddings=256,
            eos_token_id=2,
        )
    )
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(20)  # sharper logits: greedy choices are not near-ties
    path = tmp_path_factory.mktemp("tiny-tp")
    hf.save_pretrained(path)
    source = convert_gguf(resolve_model_path(DEFAULT_MODEL))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, path / name)
    return str(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pids, timeout_s=15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``, whichever of its threads started them."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def _texts(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_tp2_generates_what_tp1_does_and_close_stops_the_workers(tiny_dir):
    with LLM(tiny_dir, max_num_seqs=4, num_blocks=64, max_model_len=256) as tp1:
        expected = _texts(tp1)
    llm = LLM(tiny_dir, tensor_parallel_size=2, max_num_seqs=4, num_blocks=64, max_model_len=256)
    pids = llm.engine.runner.worker_pids
    assert len(pids) == 1 and _alive(pids[0])
    assert _texts(llm) == expected
    llm.close()
    assert _wait_gone(pids, 5) == []


def _engine(tiny_dir) -> Engine:
    return Engine.from_pretrained(
        tiny_dir,
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_model_len=256),
        cache_config=CacheConfig(num_blocks=64),
        tensor_parallel_size=2,
    )


def test_a_killed_worker_fails_the_engine_clearly_and_leaves_no_process(tiny_dir):
    engine = _engine(tiny_dir)
    (pid,) = engine.runner.worker_pids
    for prompt in PROMPTS[:2]:
        engine.add_request(prompt, SamplingParams(max_tokens=64, temperature=0))
    for _ in range(3):
        engine.step()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(
        RunnerDeadError, match=rf"worker rank 1 \(pid {pid}\) was killed by SIGKILL during a step"
    ):
        engine.step()
    assert _wait_gone([pid], 5) == []
    with pytest.raises(RunnerDeadError):  # and it stays failed, without hanging
        engine.step()
    engine.close()


def test_async_engine_ends_every_stream_when_a_worker_dies(tiny_dir):
    engine = AsyncEngine(_engine(tiny_dir))
    (pid,) = engine.engine.runner.worker_pids

    async def consume(prompt):
        async for out in engine.generate(
            prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        ):
            if len(out.outputs[0].token_ids) == 5 and prompt == PROMPTS[0]:
                os.kill(pid, signal.SIGKILL)
        return "finished"

    async def main():
        results = await asyncio.wait_for(
            asyncio.gather(*(consume(p) for p in PROMPTS), return_exceptions=True), timeout=60
        )
        with pytest.raises(EngineDeadError):
            engine.add_request("more", GREEDY)
        await engine.shutdown()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, (RunnerDeadError, EngineDeadError)) for r in results), results
    assert "killed by SIGKILL" in str(engine.error)
    engine.engine.close()
    assert _wait_gone([pid], 5) == []


@pytest.mark.slow  # a process tree killed and waited for; run by make test-all
def test_workers_exit_when_the_engine_process_is_killed(tiny_dir):
    script = textwrap.dedent(
        f"""
        import time
        from neuronserve.llm import LLM
        llm = LLM({tiny_dir!r}, tensor_parallel_size=2, num_blocks=32, max_num_seqs=2, max_model_len=256)
        print(*llm.engine.runner.worker_pids, flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
        proc.kill()  # no cleanup code runs in the parent
        proc.wait()
        assert _wait_gone(pids, 10) == [], "a worker outlived its engine"
    finally:
        proc.kill()


def test_a_script_without_a_main_guard_is_told_how_to_fix_it(tiny_dir, tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(
        "from neuronserve.llm import LLM\n"
        f"llm = LLM({tiny_dir!r}, tensor_parallel_size=2, num_blocks=32, max_num_seqs=2, max_model_len=256)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    last_error = done.stderr.strip().splitlines()
    assert "RuntimeError: tensor-parallel worker rank 1 failed to start" in done.stderr, done.stderr[-2000:]
    assert 'if __name__ == "__main__":' in done.stderr and last_error[-1].strip() == "main()"


@pytest.mark.slow  # a TP-2 server process end to end; run by make test-all
def test_serve_with_tensor_parallel_size_2(tiny_dir):
    with LLM(tiny_dir, max_num_seqs=2, num_blocks=64, max_model_len=256) as tp1:
        expected = tp1.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].text
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "neuronserve.cli", "serve", "--model", tiny_dir, "--port", str(port),
           "--tensor-parallel-size", "2", "--kv-cache-gb", "0.05", "--max-model-len", "256"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = {
            "model": tiny_dir,
            "prompt": PROMPTS[0],
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": True,
        }
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected
        workers = _children(proc.pid)
        assert workers, "no tensor-parallel worker process"
        proc.send_signal(signal.SIGINT)  # a clean shutdown stops the workers
        proc.wait(timeout=30)
        assert _wait_gone(workers, 10) == []
    finally:
        proc.kill()


@pytest.mark.slow  # SmolLM2 end to end twice; TP 2 logits = TP 1 on the tiny configs stays in make test
def test_smollm2_greedy_tokens_at_tp2_equal_tp1():
    params = SamplingParams(max_tokens=32, temperature=0)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    results = {}
    for tp in (1, 2):
        with LLM(tensor_parallel_size=tp, max_num_seqs=4, num_blocks=128, max_model_len=512) as llm:
            results[tp] = [o.outputs[0].token_ids for o in llm.chat(conversations, params, use_tqdm=False)]
    assert all(len(tokens) > 4 for tokens in results[1])
    assert results[2] == results[1]

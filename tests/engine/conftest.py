"""Engines over a tiny random Llama (fast, exact comparisons) or a scripted runner (exact control of
the token stream), both with SmolLM2's real tokenizer so that text, stop strings and markup are real."""

from __future__ import annotations

import pytest
import torch

from neuronserve.backends import get_backend
from neuronserve.backends.base import ModelRunner
from neuronserve.config import CacheConfig, ModelConfig, SchedulerConfig
from neuronserve.core import SchedulerOutput
from neuronserve.engine.engine import Engine
from neuronserve.model.llama import LlamaForCausalLM
from neuronserve.model.loader import DEFAULT_MODEL, convert_gguf, resolve_model_path
from neuronserve.model.tokenizer import Tokenizer

VOCAB = 49152  # SmolLM2's tokenizer
EOS = 2


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(convert_gguf(resolve_model_path(DEFAULT_MODEL)))


def tiny_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=EOS,
    )


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are not near-ties
        model.lm_head.weight.mul_(8)
    return model


def make_engine(
    model_or_runner,
    tokenizer=None,
    *,
    num_blocks: int = 256,
    block_size: int = 4,
    enable_prefix_caching: bool = True,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    max_model_len: int = 128,
    max_waiting: int | None = 256,
    seed: int = 0,
) -> Engine:
    sched = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        token_buckets=(8, 16, 32, 64),
        max_waiting=max_waiting,
    )
    cache = CacheConfig(
        block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching
    )
    if isinstance(model_or_runner, ModelRunner):
        runner, config = model_or_runner, model_or_runner.model_config
    else:
        config = model_or_runner.config
        runner = get_backend("cpu").build_runner(model_or_runner, config, cache, sched)
    return Engine(runner, tokenizer, config, sched, cache, seed=seed)


class ScriptedRunner(ModelRunner):
    """A runner without a model: request ``r``'s ``k``-th generated token is ``scripts[r][k]``
    (its logit is 100, every other 0: certain at any temperature), so tests decide the exact token stream."""

    def __init__(self, scripts: dict[str, list[int]]) -> None:
        self.scripts = scripts
        self.model_config = tiny_config()

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        logits = torch.zeros(len(out), VOCAB)
        for i, request in enumerate(out.requests):
            script = self.scripts[request.request_id]
            logits[i, script[min(len(request.output_token_ids), len(script) - 1)]] = 100.0
        return logits


def run_to_completion(engine: Engine, max_steps: int = 10_000) -> dict[str, list]:
    """Step until idle; every output of every request, in order, keyed by request id. Checks the
    block manager's integrity after every step."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        engine.scheduler.block_manager.check_integrity()
    assert not engine.has_unfinished(), "the engine did not finish"
    return outputs


def assert_all_blocks_free(engine: Engine) -> None:
    bm = engine.scheduler.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_usable_blocks

"""Batch invariance of the native kernels: a token's logits are the same bits whether it is decoded
alone, as the first of a speculative chunk, or beside other sequences' decodes and prefills.

That is what lets greedy speculative decoding emit exactly the tokens of plain decoding. The
context is long enough (300 tokens) for the attention kernel to split its keys into partitions.
"""

import copy

import pytest
import torch

from neuronserve.backends.cpu import CPUModelRunner
from neuronserve.backends.inputs import SeqChunk
from neuronserve.config import CacheConfig, SchedulerConfig
from neuronserve.ops import native_available
from neuronserve.quant import quantize_model

pytestmark = pytest.mark.skipif(not native_available(), reason="the native kernels are not built")

CONTEXT = 300
BLOCK = 16


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_a_tokens_logits_do_not_depend_on_what_shares_its_step(smollm2, variant):
    model, config, _ = smollm2
    model = copy.deepcopy(model)
    cache_dtype = "auto"
    if variant == "int8":
        quantize_model(model, "int8", ["embed_tokens"])  # int8 activations on VNNI CPUs
        cache_dtype = "int8"
    cache = CacheConfig(block_size=BLOCK, num_blocks=64, cache_dtype=cache_dtype)
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=1024)
    runner = CPUModelRunner(model, config, cache, sched, kernels="native")
    assert runner.kernels == "native"
    a_table, b_table, c_table = list(range(1, 21)), list(range(21, 25)), list(range(25, 33))
    prompt_a, prompt_b = _tokens(CONTEXT, 0), _tokens(40, 1)
    drafts = [1234, 555, 777, 888]
    with torch.inference_mode():
        runner.run_chunks([SeqChunk(prompt_a, 0, a_table), SeqChunk(prompt_b, 0, b_table)])
        alone = runner.run_chunks([SeqChunk([4321], CONTEXT, a_table)])[0]
        with_drafts = runner.run_chunks([SeqChunk([4321, *drafts], CONTEXT, a_table, num_logits=5)])
        batched = runner.run_chunks(
            [
                SeqChunk([77], 40, b_table),  # another sequence's decode
                SeqChunk([4321, *drafts], CONTEXT, a_table, num_logits=5),
                SeqChunk(_tokens(100, 2), 0, c_table),  # and a prefill
            ]
        )
    assert torch.equal(with_drafts[0], alone)
    assert torch.equal(batched[1], alone)
    # The drafts' rows are the same bits too, with or without the other sequences.
    torch.testing.assert_close(batched[1:6], with_drafts, atol=0, rtol=0)

    # Prefill split into other chunks (as a busy step's token budget splits it) writes the same KV
    # and ends on the same logits. (Steps of at most 256 tokens: fp32 layers hand larger ones to
    # torch's GEMM, see neuronserve.ops.linear.)
    def prefill(table: list[int], cuts: list[int]) -> torch.Tensor:
        bounds = [0, *cuts, CONTEXT]
        for lo, hi in zip(bounds, bounds[1:]):
            last = runner.run_chunks([SeqChunk(prompt_a[lo:hi], lo, table)])
        return last

    with torch.inference_mode():
        two = prefill(list(range(33, 53)), [150])
        three = prefill(list(range(1, 21)), [100, 200])
    assert torch.equal(two, three)

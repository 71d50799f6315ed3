"""Quality of a (quantized) model on a text: perplexity and teacher-forced greedy agreement."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from neuronserve.backends.inputs import SeqChunk, build_step_inputs, eager_attention_plan


@dataclass
class TextScore:
    perplexity: float
    argmax: torch.Tensor  # (N,) the model's most likely next token at each position
    num_tokens: int


@torch.inference_mode()
def score_text(
    model,
    token_ids: Sequence[int],
    window: int = 512,
    block_size: int = 16,
    kv_dtype=torch.float32,
    kernels: str = "torch",
) -> TextScore:
    """Perplexity of ``token_ids`` under ``model``, in non-overlapping windows of ``window`` tokens
    (each window starts from an empty context), through the model's own paged forward, with a KV
    cache of ``kv_dtype`` (int8 / fp8 need calibrated scales, see ``neuronserve.quant.kv``), split
    as the CPU backend splits a prefill chunk: ``kernels="native"`` on the C++ kernels (on a copy of
    the model), ``"torch"`` on torch's ops, one attention over the window's context."""
    if kernels == "native":
        from neuronserve.model.llama import EagerAttentionPlan
        from neuronserve.ops import use_native_linears

        model = use_native_linears(copy.deepcopy(model))
    nll, count, argmaxes = 0.0, 0, []
    num_blocks = -(-window // block_size)
    for start in range(0, len(token_ids) - 1, window):
        chunk = list(token_ids[start : start + window + 1])
        if len(chunk) < 2:
            break
        inputs = build_step_inputs([SeqChunk(chunk[:-1], 0, list(range(1, num_blocks + 1)))], block_size)
        kv = torch.zeros(model.kv_cache_shape(num_blocks + 1, block_size)).to(kv_dtype)
        every_position = torch.arange(len(chunk) - 1)
        args = (*inputs.as_args()[:-1], every_position)  # logits at every position, not just the last
        if kernels == "native":
            plan = EagerAttentionPlan(
                paged=(inputs.block_tables, inputs.query_start_loc, inputs.context_lens)
            )
        else:
            plan = eager_attention_plan([SeqChunk(chunk[:-1], 0, list(range(1, num_blocks + 1)))], block_size)
        logits, _ = model(*args, kv, plan=plan)
        targets = torch.tensor(chunk[1:])
        nll += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += len(targets)
        argmaxes.append(logits.argmax(-1))
    return TextScore(math.exp(nll / count), torch.cat(argmaxes), count)

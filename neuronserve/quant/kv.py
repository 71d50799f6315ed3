"""A quantized KV cache (int8 or fp8 e4m3, one byte per value): per-layer, per-head scales
calibrated once from the model's own K/V on a short built-in text.

The scales are static, as Neuron's compiled graphs want them: each head's scale is the largest
|K| (or |V|) seen in calibration times a headroom, over the format's largest value; later values
beyond it are clipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuronserve.backends.inputs import SeqChunk, build_step_inputs

HEADROOM = 1.25
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
CALIBRATION_TEXT = (
    "You are a helpful shopping assistant. A customer asks which blender to buy for crushing ice, "
    "how to keep a cast iron skillet in good shape, and whether noise-cancelling headphones are "
    "worth the money for a daily commute. Compare prices, ratings and reviews, mention warranty "
    "terms, and answer briefly and concretely. 1. Durability 2. Value 3. Comfort. Prices: $49.99, "
    '$129, $349.50. <product id="B0123456789"/> is rated 4.5/5 by 1,204 reviewers.'
)


@torch.inference_mode()
def calibrate_kv_scales(model, token_ids: Sequence[int], dtype: torch.dtype, block_size: int = 16) -> None:
    """Set every attention layer's ``kv_scale`` for a ``dtype`` (int8 / fp8) cache from one
    float32 prefill of ``token_ids``."""
    if dtype not in QMAX:
        raise ValueError(f"cache_dtype: {dtype} is not a quantized KV format")
    n = len(token_ids)
    num_blocks = -(-n // block_size)
    inputs = build_step_inputs([SeqChunk(list(token_ids), 0, list(range(1, num_blocks + 1)))], block_size)
    kv = torch.zeros(model.kv_cache_shape(num_blocks + 1, block_size))  # float32 for calibration
    for layer in model.layers:
        layer.self_attn.kv_scale.fill_(1.0)
    model(*inputs.as_args(), kv)
    written = kv[:, :, 1:].transpose(2, 3).flatten(3, 4)[:, :, :, :n]  # (layers, 2, kvh, n, hd)
    amax = written.abs().amax(dim=(3, 4))  # (layers, 2, kvh)
    for layer, peak in zip(model.layers, amax):
        layer.self_attn.kv_scale.copy_((peak * HEADROOM / QMAX[dtype]).clamp(min=1e-6))

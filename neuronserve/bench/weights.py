"""What a decode step reads of a model's weights, for bandwidth figures."""

from __future__ import annotations

import torch


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """The weight bytes one decode step reads: every linear layer once, as its kernel reads it, the
    norms, and the LM head. A native layer (``neuronserve.ops.linear.NativeLinear``) holds its
    tensors as plain attributes, not parameters, so they are counted from what it passes the kernel
    (on the VNNI path its packed copy, not its int8 rows). The embedding is skipped (a step reads
    one row of it); a tensor two modules share (a tied LM head) counts once."""
    from neuronserve.ops.linear import NativeLinear

    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if tensor is not None and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()

    embedding = getattr(model, "embed_tokens", None)
    for module in model.modules():
        if isinstance(module, NativeLinear):
            add(module.packed if module.packed is not None else module.weight)
            for tensor in (module.scale, module.minimum, module.bias):
                add(tensor)
            continue
        if module is embedding:
            continue
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name not in ("inv_freq", "kv_scale"):  # not weights: RoPE's frequencies, KV-cache scales
                add(tensor)
    return total

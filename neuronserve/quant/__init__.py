"""Quantization as module swaps: ``quantize_model(model, "int8" | "fp8" | "int4")`` replaces each
``nn.Linear`` (but the embedding and the LM head, by default) with its quantized twin; the model
code does not change. See ``neuronserve.quant.linear`` for the formats and the CPU kernels."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from neuronserve.parallel.layers import carry_collective
from neuronserve.quant.linear import METHODS, FP8Linear, Int4Linear, Int8Linear, QuantizedLinear

DEFAULT_MODULES_TO_NOT_CONVERT = ("embed_tokens", "lm_head")

__all__ = ["METHODS", "FP8Linear", "Int4Linear", "Int8Linear", "QuantizedLinear", "quantize_model"]


def quantize_model(
    model: nn.Module,
    method: str,
    modules_to_not_convert: Iterable[str] | None = None,
    group_size: int = 32,
) -> nn.Module:
    """Swap every ``nn.Linear`` whose name has none of ``modules_to_not_convert`` in it (``None``:
    the embedding and the LM head) for a ``method`` layer, in place; returns the model.
    ``group_size``: inputs per int4 group (32 divides every Llama-family hidden size we load)."""
    if method not in METHODS:
        raise ValueError(f"quantization: unknown method {method!r}; choose from {', '.join(METHODS)}")
    skip = tuple(DEFAULT_MODULES_TO_NOT_CONVERT if modules_to_not_convert is None else modules_to_not_convert)
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{module_name}.{child_name}" if module_name else child_name
            if not isinstance(child, nn.Linear) or any(s in full for s in skip):
                continue
            if method == "int4":
                swapped = Int4Linear.from_linear(child, group_size)
            else:
                swapped = METHODS[method].from_linear(child)
            setattr(module, child_name, carry_collective(child, swapped))
    model.quantization = {"method": method, "modules_to_not_convert": list(skip), "group_size": group_size}
    return model

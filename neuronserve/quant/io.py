"""Offline quantization: write a quantized model once, load it later without recomputing.

A quantized directory holds ``model.safetensors`` (neuronserve's own parameter names: ``qweight``,
``scale``, ... per layer), ``quantization_config.json``, and the source model's ``config.json`` and
tokenizer files, so it loads like any model directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

QUANT_CONFIG = "quantization_config.json"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def save_quantized(model: torch.nn.Module, source_dir: Path, out_dir: str | Path) -> Path:
    """Write a model quantized by ``quantize_model`` (its config and tokenizer from ``source_dir``)."""
    from safetensors.torch import save_model

    quantization = getattr(model, "quantization", None)
    if quantization is None:
        raise ValueError("model: not quantized; call neuronserve.quant.quantize_model first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / "model.safetensors"))  # handles the tied embedding / LM head
    for name in ("config.json", *_TOKENIZER_FILES):
        if (Path(source_dir) / name).is_file():
            shutil.copy(Path(source_dir) / name, out / name)
    (out / QUANT_CONFIG).write_text(json.dumps({"format": "neuronserve", **quantization}, indent=2) + "\n")
    return out


def is_quantized_dir(path: Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def load_quantized(path: Path):
    """The quantized model in ``path`` with its config (no quantization is recomputed)."""
    from safetensors.torch import load_model as load_safetensors

    from neuronserve.model.llama import LlamaForCausalLM
    from neuronserve.model.loader import read_hf_config
    from neuronserve.quant import quantize_model

    spec = json.loads((Path(path) / QUANT_CONFIG).read_text())
    if spec.get("format") != "neuronserve":
        raise ValueError(f"model: {path / QUANT_CONFIG} is not a neuronserve quantization config")
    config = read_hf_config(Path(path))
    with torch.device("meta"):  # the quantized layers' structure, without computing any quantization
        module = quantize_model(
            LlamaForCausalLM(config), spec["method"], spec["modules_to_not_convert"], spec["group_size"]
        )
    module.materialize()
    load_safetensors(module, str(Path(path) / "model.safetensors"), strict=True)
    return module.eval(), config

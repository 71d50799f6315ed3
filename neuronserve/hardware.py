"""Neuron hardware as data, and the check that a model fits before anything is compiled.

Figures are AWS's published per-chip numbers, kept with their sources in
``neuronserve/data/neuron_hardware.json``; a NeuronCore's share is the chip's divided by its cores
(Trn2: logical cores at the default LNC=2, 4 per chip). Standard library only: the fit check runs from a
model config, with no weights and no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from neuronserve.parallel.heads import HeadLayout

GIB = 2**30


@dataclass(frozen=True)
class NeuronChip:
    name: str
    cores: int  # NeuronCores a model can be sharded over (logical, at the default LNC)
    hbm_gib: float
    hbm_gb_per_s: float
    bf16_tflops: float
    fp8_tflops: float
    neuronlink_gb_per_s: float

    @property
    def hbm_gib_per_core(self) -> float:
        return self.hbm_gib / self.cores


@dataclass(frozen=True)
class NeuronInstance:
    name: str
    chip: NeuronChip
    chips: int

    @property
    def cores(self) -> int:
        return self.chips * self.chip.cores

    @property
    def family(self) -> str:
        return neuron_family(self.name)


def hardware_data() -> dict:
    """The data file: chips with each figure's public source, and instance types."""
    return json.loads(resources.files("neuronserve").joinpath("data/neuron_hardware.json").read_text())


_DATA = hardware_data()
CHIPS = {
    key: NeuronChip(**{k: v for k, v in chip.items() if k != "sources"})
    for key, chip in _DATA["chips"].items()
}
INSTANCES = {
    name: NeuronInstance(name, CHIPS[spec["chip"]], spec["chips"])
    for name, spec in _DATA["instances"].items()
}

# Tensor-parallel degrees Neuron supports per instance family.
NEURON_TP_DEGREES: dict[str, tuple[int, ...]] = {
    "inf2": (1, 2, 4, 8, 24),
    "trn1": (1, 2, 8, 16, 32),
    "trn2": tuple(range(1, 65)),
}
FAMILY_CHIPS = {"inf2": "inferentia2", "trn1": "trainium1", "trn2": "trainium2"}


def neuron_family(target: str) -> str:
    """``inf2``, ``trn1`` or ``trn2`` for a family or an instance type (``trn1n`` is ``trn1``)."""
    family = target.lower().split(".")[0]
    family = "trn1" if family == "trn1n" else family
    if family not in NEURON_TP_DEGREES:
        raise ValueError(
            f"target: {target!r} is not a Neuron instance family or type; "
            f"families: {', '.join(NEURON_TP_DEGREES)}; types: {', '.join(INSTANCES)}"
        )
    return family


def get_instance(name: str) -> NeuronInstance:
    if name.lower() not in INSTANCES:
        raise ValueError(f"instance: unknown Neuron instance {name!r}; known: {', '.join(INSTANCES)}")
    return INSTANCES[name.lower()]


# ------------------------------------------------------------------ memory per NeuronCore
# Bytes a weight takes per format, with its scales: int8/fp8 one fp32 scale per output row;
# int4 two nibbles a byte plus an fp32 scale and minimum per group of 32 inputs.
def _linear_bytes(rows: int, cols: int, dtype_bytes: float, quantization: str | None) -> float:
    if quantization in ("int8", "fp8"):
        return rows * cols + 4 * rows
    if quantization == "int4":
        return rows * cols / 2 + 8 * rows * (cols / 32)
    return rows * cols * dtype_bytes


def weight_bytes_per_rank(
    config, tp: int = 1, dtype_bytes: float = 2, quantization: str | None = None
) -> float:
    """One rank's weight bytes, padding included (zero heads, padded vocabulary and MLP rows), for a
    ``ModelConfig``. The embedding and LM head stay in ``dtype_bytes``; quantization applies to the
    decoder's linear layers."""
    layout = HeadLayout(config.num_attention_heads, config.num_key_value_heads, tp)
    h, hd = config.hidden_size, config.head_dim
    vocab = -(-config.vocab_size // tp)
    inter = -(-config.intermediate_size // tp)
    q, kv = layout.q_per_rank * hd, layout.kv_per_rank * hd
    per_layer = (
        _linear_bytes(q + 2 * kv, h, dtype_bytes, quantization)
        + _linear_bytes(h, q, dtype_bytes, quantization)
        + _linear_bytes(2 * inter, h, dtype_bytes, quantization)
        + _linear_bytes(h, inter, dtype_bytes, quantization)
        + 2 * h * dtype_bytes
    )
    embed = vocab * h * dtype_bytes
    head = 0 if config.tie_word_embeddings else vocab * h * dtype_bytes
    return config.num_hidden_layers * per_layer + embed + head + h * dtype_bytes


def kv_bytes_per_rank(config, tp: int, tokens: int, kv_dtype_bytes: float = 2) -> float:
    """One rank's KV cache for ``tokens`` cached tokens (replicated KV heads included)."""
    layout = HeadLayout(config.num_attention_heads, config.num_key_value_heads, tp)
    return 2 * config.num_hidden_layers * tokens * layout.kv_per_rank * config.head_dim * kv_dtype_bytes


@dataclass
class FitReport:
    """What one NeuronCore must hold, term by term, against what it has (bytes)."""

    instance: str
    tp: int
    weights: float
    kv_cache: float
    activations: float
    reserve: float
    capacity: float

    @property
    def needed(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.reserve

    @property
    def fits(self) -> bool:
        return self.needed <= self.capacity

    def describe(self) -> str:
        def g(x: float) -> str:
            return f"{x / GIB:.2f} GiB"

        verdict = "fits" if self.fits else f"does not fit: short by {g(self.needed - self.capacity)}"
        return (
            f"{self.instance} at TP {self.tp}: each NeuronCore needs {g(self.needed)} (weights "
            f"{g(self.weights)} + KV cache {g(self.kv_cache)} + activations {g(self.activations)} + "
            f"runtime reserve {g(self.reserve)}) of its {g(self.capacity)} HBM: {verdict}"
        )


def fit_report(
    config,
    instance: str,
    tp: int,
    *,
    dtype_bytes: float = 2,
    quantization: str | None = None,
    kv_tokens: int = 2048,
    kv_dtype_bytes: float | None = None,
    max_bucket_tokens: int = 512,
    reserve_fraction: float = 0.1,
) -> FitReport:
    """The memory one NeuronCore of ``instance`` needs for ``config`` at TP ``tp``.

    ``kv_tokens``: tokens the KV cache holds (batch x max length); activations: the largest bucket's
    logits and a few hidden-state buffers; ``reserve_fraction`` of HBM is kept for the runtime and
    compiler scratch (an assumption, stated in the report)."""
    inst = get_instance(instance)
    from neuronserve.config import ParallelConfig  # the degree must be one Neuron supports there

    ParallelConfig(tp, instance)
    capacity = inst.chip.hbm_gib_per_core * GIB
    kv_dtype_bytes = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
    vocab = -(-config.vocab_size // tp)
    activations = max_bucket_tokens * (vocab * 4 + 8 * config.hidden_size * dtype_bytes)
    return FitReport(
        instance=inst.name,
        tp=tp,
        weights=weight_bytes_per_rank(config, tp, dtype_bytes, quantization),
        kv_cache=kv_bytes_per_rank(config, tp, kv_tokens, kv_dtype_bytes),
        activations=activations,
        reserve=reserve_fraction * capacity,
        capacity=capacity,
    )


def check_fit(config, instance: str, tp: int, **kwargs) -> FitReport:
    """``fit_report``, raising ``ValueError`` with its numbers when the model does not fit."""
    report = fit_report(config, instance, tp, **kwargs)
    if not report.fits:
        raise ValueError(f"tensor_parallel_size: {report.describe()}")
    return report

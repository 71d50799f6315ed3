"""Step time from first principles: bytes moved and FLOPs done by one scheduled step, each against
a hardware profile's bandwidth and compute with efficiency factors, plus tensor-parallel
collectives and a fixed overhead. Every term is kept in the breakdown.

For a step of sequences ``(new tokens n_i, tokens already computed s_i)`` on one rank:

- weight bytes: every decoder linear layer's shard once, plus the LM head's shard (a step reads
  one embedding row per token: ignored); bytes per weight from the quantization;
- KV bytes: each sequence's context ``s_i + n_i`` read once per layer, the new tokens' K/V written;
- FLOPs: ``2 x tokens x linear parameters`` + attention ``4 x head_dim x q_heads x sum over tokens
  of their context`` per layer + ``2 x sequences x vocab shard x hidden`` for the logits;
- collectives (TP > 1): ``2 x layers + 1`` all-reduces of the step's hidden states (ring:
  ``2 (tp - 1) / tp`` of the bytes cross the link) and one all-gather of the logits, each with a
  fixed latency;
- time = overhead + (max(compute, memory) when the profile overlaps them, else their sum) +
  collectives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from neuronserve.config import ModelConfig
from neuronserve.parallel.heads import HeadLayout


@dataclass
class Profile:
    """One rank's hardware, with the efficiency factors a measurement fitted."""

    name: str
    peak_flops: float  # FLOP/s of one rank at the compute dtype
    mem_bytes_per_s: float  # HBM (or DRAM) bandwidth of one rank
    link_bytes_per_s: float = math.inf  # collective bandwidth of one rank
    collective_latency_s: float = 0.0  # per all-reduce / all-gather
    step_overhead_s: float = 0.0  # per step (launch, scheduling, sampling)
    seq_overhead_s: float = 0.0  # per scheduled sequence (sampling, detokenizing)
    compute_eff: float = 1.0
    memory_eff: float = 1.0
    kv_eff: float | None = None  # KV-cache reads (gathers), if they differ from weight reads
    overlap: bool = True  # compute and memory overlap (accelerators) or add up (this CPU)
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelCost:
    """What a step reads and computes depends on the model, TP degree and number formats."""

    config: ModelConfig
    tp: int = 1
    weight_bytes: float = 2.0  # per weight, unquantized
    quantization: str | None = None  # int8 / fp8: 1 byte (+ scales); int4: half a byte (+ scales)
    kv_bytes: float = 2.0  # per cached value
    act_bytes: float = 2.0  # per activation crossing a collective

    def __post_init__(self) -> None:
        c, tp = self.config, self.tp
        layout = HeadLayout(c.num_attention_heads, c.num_key_value_heads, tp)
        self.q_dim = layout.q_per_rank * c.head_dim
        self.kv_dim = layout.kv_per_rank * c.head_dim
        self.q_heads = layout.q_per_rank
        inter = -(-c.intermediate_size // tp)
        self.vocab_shard = -(-c.vocab_size // tp)
        h = c.hidden_size
        self.linear_params = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * inter
        self.head_params = self.vocab_shard * h

    def bytes_per_weight(self) -> float:
        return {"int8": 1.0, "fp8": 1.0, "int4": 0.5}.get(self.quantization, self.weight_bytes)

    def weight_read_bytes(self) -> float:
        """Decoder linear shards (quantized, scales ~1%) + the LM head shard (unquantized)."""
        decoder = self.config.num_hidden_layers * self.linear_params * self.bytes_per_weight()
        scales = 0.01 * decoder if self.quantization else 0.0
        return decoder + scales + self.head_params * self.weight_bytes


@dataclass
class StepBreakdown:
    tokens: int
    seqs: int
    weight_bytes: float
    kv_bytes: float
    flops: float
    compute_s: float
    memory_s: float
    collective_s: float
    overhead_s: float
    total_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def step_time(
    profile: Profile, cost: ModelCost, chunks: Sequence[tuple[int, int]], num_logits: int | None = None
) -> StepBreakdown:
    """The modelled time of one step; ``chunks``: ``(new tokens, tokens computed before)`` for each
    scheduled sequence; ``num_logits``: LM-head rows (default one per sequence; speculative
    decoding verifies ``k + 1`` per drafting sequence)."""
    c = cost.config
    layers, hd = c.num_hidden_layers, c.head_dim
    tokens = sum(n for n, _ in chunks)
    seqs = len(chunks)
    # Sum over new tokens of the context each attends to: start+1 ... start+n.
    attended = sum(n * s + n * (n + 1) // 2 for n, s in chunks)
    context = sum(n + s for n, s in chunks)
    weight_bytes = cost.weight_read_bytes() if tokens else 0.0
    kv_bytes = layers * 2 * cost.kv_dim * cost.kv_bytes * (context + tokens)
    flops = 2 * tokens * layers * cost.linear_params + 4 * hd * cost.q_heads * attended * layers
    flops += 2 * (seqs if num_logits is None else num_logits) * cost.head_params
    compute_s = flops / (profile.peak_flops * profile.compute_eff)
    kv_eff = profile.kv_eff if profile.kv_eff is not None else profile.memory_eff
    memory_s = weight_bytes / (profile.mem_bytes_per_s * profile.memory_eff)
    memory_s += kv_bytes / (profile.mem_bytes_per_s * kv_eff)
    collective_s = 0.0
    if cost.tp > 1 and tokens:
        ring = 2 * (cost.tp - 1) / cost.tp
        reduce_bytes = tokens * c.hidden_size * cost.act_bytes
        collective_s = (2 * layers + 1) * (
            profile.collective_latency_s + ring * reduce_bytes / profile.link_bytes_per_s
        )
        gather_bytes = seqs * c.vocab_size * 4 * (cost.tp - 1) / cost.tp
        collective_s += profile.collective_latency_s + gather_bytes / profile.link_bytes_per_s
    overhead_s = (profile.step_overhead_s + profile.seq_overhead_s * seqs) if tokens else 0.0
    busy = max(compute_s, memory_s) if profile.overlap else compute_s + memory_s
    return StepBreakdown(
        tokens=tokens,
        seqs=seqs,
        weight_bytes=weight_bytes,
        kv_bytes=kv_bytes,
        flops=flops,
        compute_s=compute_s,
        memory_s=memory_s,
        collective_s=collective_s,
        overhead_s=overhead_s,
        total_s=overhead_s + busy + collective_s,
    )


def expected_tokens_per_step(k: int, acceptance_rate: float) -> float:
    """Tokens a drafting sequence emits per step when each of its ``k`` drafts is accepted with
    probability ``acceptance_rate`` (independently, until the first rejection), plus the target's
    own token: ``(1 - a^(k+1)) / (1 - a)``."""
    a = acceptance_rate
    return float(k + 1) if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


def speculative_speedup(
    profile: Profile, cost: ModelCost, batch: int, context: int, k: int, acceptance_rate: float
) -> float:
    """Modelled decode speedup of speculation for ``batch`` sequences at ``context`` tokens: tokens
    per step gained over the cost of a step of ``k + 1`` tokens per sequence. Above 1 it pays;
    it falls with the batch as the step turns from weight reads to compute."""
    plain = step_time(profile, cost, [(1, context)] * batch).total_s
    spec = step_time(profile, cost, [(k + 1, context)] * batch, num_logits=batch * (k + 1)).total_s
    return expected_tokens_per_step(k, acceptance_rate) * plain / spec

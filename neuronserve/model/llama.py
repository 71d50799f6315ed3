"""The Llama-family model, written once for static shapes over a paged KV cache.

Every backend calls the same ``forward``. A step is flat: the new tokens of all scheduled sequences
(prefill chunks and decode tokens alike) lie back to back in ``input_ids[T]``; sequence ``b`` owns
tokens ``query_start_loc[b]:query_start_loc[b+1]``. There is no data-dependent Python control flow,
so the function traces to one static graph per (T, B, max_blocks) shape.

KV cache layout: ``[num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]`` (within a
block, each KV head's rows are one contiguous run). Each new token's K/V is written to
``slot_mapping[t]`` (``block_id * block_size + offset``; padding tokens write to the reserved pad
block 0); each token then attends over its own sequence's context, gathered through the block
table and masked by position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from neuronserve import ops
from neuronserve.config import ModelConfig
from neuronserve.ops.attention import cache_rows, head_block_rows, write_kv_reference
from neuronserve.ops.attention import raw_kv as _raw
from neuronserve.parallel.group import SINGLE, TPGroup
from neuronserve.parallel.heads import HeadLayout
from neuronserve.parallel.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    default_weight_loader,
    head_rows,
)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies ``[head_dim / 2]``, with linear or llama3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind != "llama3":
        raise ValueError(f"rope_scaling: type {kind!r} is not supported (supported: linear, llama3)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` by ``cos/sin [T, 1, head_dim]`` (the rotate-half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _gather(
    cache: torch.Tensor,
    index: torch.Tensor,
    out: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocks ``index`` of one layer's K or V ``cache (num_blocks, kvh, block_size, hd)``, head by
    head: ``(kvh, len(index), block_size, hd)``, so that each head's context is one run. One
    index_select of whole head-blocks (each a contiguous run of memory) over the cache seen as
    ``(num_blocks * kvh, block_size, hd)``: ~2x faster than the token-major gather it replaced,
    ~10x faster than index_select along the block dimension of a heads-first view. ``out``: a
    buffer of at least that many elements to gather into; ``rows``: ``head_block_rows(index)``
    when the caller has it."""
    num_blocks, kvh, block_size, hd = cache.shape
    rows = head_block_rows(index, kvh) if rows is None else rows
    flat = _raw(cache).view(num_blocks * kvh, block_size, hd)
    if out is None:
        blocks = flat.index_select(0, rows).view(kvh, index.numel(), block_size, hd)
        # Only an fp8 cache needs its bytes viewed back; a same-dtype view is an op torch-xla
        # does not lower (a CPU fallback mid-graph).
        return blocks.view(cache.dtype) if blocks.dtype != cache.dtype else blocks
    out = out.view(-1)[: rows.numel() * block_size * hd].view(rows.numel(), block_size, hd)
    torch.index_select(flat, 0, rows, out=_raw(out))
    return out.view(kvh, index.numel(), block_size, hd)


@dataclass
class EagerAttentionPlan:
    """Optional, eager-only: how to split a step's attention for speed on CPU.

    Tokens ``[0, num_decode_tokens)`` are one-token decodes of different sequences and use the
    static gather path; each prefill segment ``(token_start, token_end, context_len, blocks)`` runs
    one attention over its sequence's context, gathered once instead of once per token. The traced
    and Neuron paths never pass a plan, so their graphs stay free of data-dependent control flow.

    ``workspace``: two buffers of whole KV blocks ``(n, kvh, block_size, hd)`` that the decode
    gather writes into, reused by every layer and step. Without them each layer allocates its
    gathered context afresh; at 32 sequences of ~500 tokens those multi-megabyte allocations went
    back to the OS and page-faulted in again, which measured up to 5x slower than the copy itself.

    ``paged``: ``(block_tables, query_start_loc, context_lens)`` of the step: every token's
    attention runs on the native paged-attention kernel (``neuronserve.ops``), which reads the
    cache in place through the block tables; the other fields are then unused.
    """

    num_decode_tokens: int = 0
    prefill_segments: list[tuple[int, int, int, torch.Tensor]] = field(default_factory=list)
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None
    paged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    rolled_sin: torch.Tensor | None = None  # set by the model for the paged path (see Attention)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            # Eager fp32 (the CPU backend): torch's one-op RMSNorm, the same arithmetic as below in
            # one call instead of six (~60 norms a step cost their dispatch at one token a step).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()  # the composite that tracing and the Neuron / torch-xla graphs see
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """This rank's heads (all of them at TP 1): ``num_heads`` / ``num_kv_heads`` are local counts,
    padding and replicated KV heads included (see ``neuronserve.parallel.heads``)."""

    def __init__(self, config: ModelConfig, group: TPGroup = SINGLE) -> None:
        super().__init__()
        layout = HeadLayout(config.num_attention_heads, config.num_key_value_heads, group.size)
        self.num_heads = layout.q_per_rank
        self.num_kv_heads = layout.kv_per_rank
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        # q, k and v in one matmul, split by heads; loaded from separate checkpoint tensors.
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, layout, bias=config.attention_bias, group=group
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            group=group,
            in_index=head_rows(layout.q_heads(group.rank), self.head_dim),
        )
        # Per-head scales of a quantized (int8 / fp8) KV cache, [K or V, kvh]; set by
        # neuronserve.quant.kv.calibrate_kv_scales. Unused with a float cache.
        self.register_buffer("kv_scale", torch.ones(2, self.num_kv_heads), persistent=False)

    def _load(self, x: torch.Tensor, which: int, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype in (torch.int8, torch.float8_e4m3fn):
            return x.to(dtype) * self.kv_scale[which].view(-1, 1, 1).to(dtype)  # heads at dim -3
        return x.to(dtype)

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,  # (2, num_blocks, kvh, block_size, hd), this layer's
        slot_mapping: torch.Tensor,  # (T,)
        context_block_tables: torch.Tensor,  # (T, max_blocks): each token's sequence's blocks
        attn_mask: torch.Tensor,  # (T, 1, 1, max_blocks * block_size) bool, True = attend
        positions: torch.Tensor,  # (T,)
        plan: EagerAttentionPlan | None = None,
        cache_index: tuple[torch.Tensor, torch.Tensor] | None = None,  # see LlamaForCausalLM.forward
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        if plan is not None and plan.paged is not None:
            # The native kernels: RoPE on q and k at once (three ops instead of a dozen: at one
            # token a step these small ops cost their dispatch), write the new K/V, then read
            # every context in place.
            nh, hd, qk_size = self.num_heads, self.head_dim, self.q_size + self.kv_size
            qk = qkv[:, :qk_size].view(T, nh + self.num_kv_heads, hd)
            qk = qk * cos + qk.roll(hd // 2, dims=-1) * plan.rolled_sin
            v = qkv[:, qk_size:].reshape(T, self.num_kv_heads, hd).contiguous()
            ops.write_kv(qk[:, nh:].contiguous(), v, kv_cache, slot_mapping, self.kv_scale)
            q = qk[:, :nh].contiguous()  # (a view already contiguous at one token)
            out = ops.paged_attention(q, kv_cache, *plan.paged, self.kv_scale, self.scale)
            return self.o_proj(out.view(T, self.q_size))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(T, self.num_heads, self.head_dim), cos, sin)  # (T, nh, hd)
        k = apply_rope(k.view(T, self.num_kv_heads, self.head_dim), cos, sin)  # (T, kvh, hd)
        v = v.view(T, self.num_kv_heads, self.head_dim)

        # Write the new tokens' K/V into their slots (quantized for an int8 / fp8 cache: the same
        # torch composite the native kernel is tested against), then read every context back.
        write_rows, gather_rows = cache_index if cache_index is not None else (None, None)
        write_kv_reference(k, v, kv_cache, slot_mapping, self.kv_scale, rows=write_rows)
        if plan is None:
            out = self._gathered_attention(q, kv_cache, context_block_tables, attn_mask, rows=gather_rows)
        else:
            out = self._planned_attention(q, kv_cache, context_block_tables, attn_mask, positions, plan)
        return self.o_proj(out.reshape(T, self.q_size))

    def _gathered_attention(
        self, q, kv_cache, context_block_tables, attn_mask, workspace=None, rows=None
    ) -> torch.Tensor:
        """Each token attends over its own sequence's context, gathered per token (static shapes)."""
        T = q.shape[0]
        # index_select over whole blocks (each one contiguous run of memory) moves the context at
        # memory speed; advanced indexing (cache[tables]) measured ~4x slower on CPU.
        flat = context_block_tables.reshape(-1)
        rows = head_block_rows(flat, self.num_kv_heads) if rows is None else rows
        if workspace is None:
            keys, values = _gather(kv_cache[0], flat, rows=rows), _gather(kv_cache[1], flat, rows=rows)
        else:
            n = flat.shape[0]
            keys = _gather(kv_cache[0], flat, out=workspace[0][:n], rows=rows)
            values = _gather(kv_cache[1], flat, out=workspace[1][:n], rows=rows)
        # (kvh, T * blocks, block_size, hd) -> (T, kvh, L, hd), a view
        keys = keys.view(self.num_kv_heads, T, -1, self.head_dim).transpose(0, 1)
        values = values.view(self.num_kv_heads, T, -1, self.head_dim).transpose(0, 1)
        # Grouped-query attention: each KV head serves num_heads / num_kv_heads query heads.
        group = self.num_heads // self.num_kv_heads
        q = q.view(T, self.num_kv_heads, group, self.head_dim)  # (T, kvh, g, hd)
        keys, values = self._load(keys, 0, q.dtype), self._load(values, 1, q.dtype)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=self.scale)
        return out.reshape(T, self.num_heads, self.head_dim)

    def _planned_attention(
        self, q, kv_cache, context_block_tables, attn_mask, positions, plan
    ) -> torch.Tensor:
        d = plan.num_decode_tokens
        parts = []
        if d:
            tables = context_block_tables[:d]
            parts.append(self._gathered_attention(q[:d], kv_cache, tables, attn_mask[:d], plan.workspace))
        for start, end, context_len, blocks in plan.prefill_segments:
            keys = _gather(kv_cache[0], blocks).flatten(1, 2)[:, :context_len]  # (kvh, ctx, hd)
            values = _gather(kv_cache[1], blocks).flatten(1, 2)[:, :context_len]
            mask = torch.arange(context_len)[None, :] <= positions[start:end, None]  # causal, (n, ctx)
            out = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),  # (nh, n, hd)
                self._load(keys, 0, q.dtype),  # (kvh, ctx, hd)
                self._load(values, 1, q.dtype),
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )
            parts.append(out.transpose(0, 1))  # (n, nh, hd)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, group: TPGroup = SINGLE) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], group=group)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, group=group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, group: TPGroup = SINGLE) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, group)

    def forward(self, x, *attention_inputs):
        """``attention_inputs``: ``Attention.forward``'s arguments after ``x`` (cos, sin, this layer's
        cache, slot_mapping, context_block_tables, attn_mask, positions, plan, cache_index)."""
        x = x + self.self_attn(self.input_layernorm(x), *attention_inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Llama 2/3, SmolLM2, Mistral (full attention) and Qwen2 (q/k/v bias).

    ``tp_group``: this process's tensor-parallel group; the model holds that rank's shard of every
    layer (all of it with the default group of one) and reads the same at any degree.
    """

    # checkpoint name fragment -> (our parameter fragment, its part of the fused parameter)
    _fused = {
        ".q_proj.": (".qkv_proj.", "q"),
        ".k_proj.": (".qkv_proj.", "k"),
        ".v_proj.": (".qkv_proj.", "v"),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
    }

    def __init__(self, config: ModelConfig, tp_group: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp_group = tp_group
        self.head_layout = HeadLayout(config.num_attention_heads, config.num_key_value_heads, tp_group.size)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp_group)
        self.layers = nn.ModuleList(DecoderLayer(config, tp_group) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp_group)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # The eager CPU backend's native decoder stack (neuronserve.ops.layers), if it set one.
        self.native_stack = None

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after ``to_empty``);
        a quantized LM head keeps its own weights."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # (or a subclass)
            self.lm_head.weight = self.embed_tokens.weight

    def materialize(self) -> LlamaForCausalLM:
        """Allocate a model built on the meta device (weights uninitialized: load them next), tie the
        LM head again and set the buffers no checkpoint holds: RoPE frequencies, KV-cache scales."""
        self.to_empty(device="cpu")
        self.tie_weights()
        with torch.no_grad():
            self.inv_freq.copy_(rope_inv_freq(self.config))
            for layer in self.layers:
                layer.self_attn.kv_scale.fill_(1.0)
        return self

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """This rank's KV cache: its local KV heads (replicas included) of every layer."""
        c = self.config
        return (c.num_hidden_layers, 2, num_blocks, self.head_layout.kv_per_rank, block_size, c.head_dim)

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        slot_mapping: torch.Tensor,  # (T,) int64
        block_tables: torch.Tensor,  # (B, max_blocks) int64, padded with the pad block 0
        context_lens: torch.Tensor,  # (B,) int64: tokens in each sequence after this step
        query_start_loc: torch.Tensor,  # (B + 1,) int64
        logits_indices: torch.Tensor,  # (B,) int64: the token whose logits each sequence needs
        kv_cache: torch.Tensor,  # (layers, 2, num_blocks, kvh, block_size, hd), updated in place
        plan: EagerAttentionPlan | None = None,  # eager CPU only; see EagerAttentionPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed_tokens(input_ids)
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        layers = self.layers
        if plan is not None and plan.paged is not None:  # the kernel needs no per-token tables or mask
            context_block_tables = attn_mask = None
            # rotate_half(x) * sin == roll(x, hd / 2) * sin with its first half negated (exactly)
            half = sin.shape[-1] // 2
            plan.rolled_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            stack = self.native_stack
            if stack is not None and stack.accepts(x, kv_cache):  # every layer in one native call
                x = stack(x, cos, plan.rolled_sin, slot_mapping, *plan.paged, kv_cache)
                layers = ()
        else:
            context_block_tables, attn_mask = self._token_tables_and_mask(
                positions, block_tables, context_lens, query_start_loc, kv_cache.shape[4]
            )
        cache_index = None
        if plan is None:  # the traced / Neuron graph: the cache rows once, not once per layer
            kvh, block_size = kv_cache.shape[3], kv_cache.shape[4]
            cache_index = (
                cache_rows(slot_mapping, kvh, block_size),
                head_block_rows(context_block_tables.reshape(-1), kvh),
            )
        for i, layer in enumerate(layers):
            x = layer(
                x,
                cos,
                sin,
                kv_cache[i],
                slot_mapping,
                context_block_tables,
                attn_mask,
                positions,
                plan,
                cache_index,
            )
        x = self.norm(x[logits_indices])  # (B, hidden)
        return self.lm_head(x).float(), kv_cache

    @staticmethod
    def _token_tables_and_mask(positions, block_tables, context_lens, query_start_loc, block_size):
        """Each token's sequence's block table ``(T, max_blocks)`` and its attention mask
        ``(T, 1, 1, max_blocks * block_size)`` (True = attend)."""
        T = positions.shape[0]
        # Which sequence each token belongs to; padding tokens past the last sequence clamp to it
        # (their outputs are never read, and their K/V goes to the pad slot).
        # (A compare-and-count rather than searchsorted, which torch-xla does not lower.)
        token_idx = torch.arange(T, device=positions.device)
        seq_idx = (query_start_loc[None, 1:] <= token_idx[:, None]).sum(-1)
        seq_idx = seq_idx.clamp(max=block_tables.shape[0] - 1)
        context_block_tables = block_tables[seq_idx]  # (T, max_blocks)
        key_pos = torch.arange(block_tables.shape[1] * block_size, device=positions.device)
        # Causal and in-sequence at once: a token sees keys at positions <= its own. Padding
        # tokens (context 0) still see key 0, the pad slot, so no softmax row is empty (NaN).
        token_context = context_lens[seq_idx].clamp(min=1)
        valid = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] < token_context[:, None])
        return context_block_tables, valid[:, None, None, :]

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors (``model.layers.0.self_attn.q_proj.weight``, ...).

        Each full tensor goes to its layer's ``weight_loader``, which keeps this rank's shard; the
        separate q/k/v and gate/up tensors go to their part of the fused layer. Raises ``ValueError``
        on a missing or unexpected tensor, or a shape mismatch.
        """
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        loaded: set[tuple[str, object]] = set()
        for name, tensor in weights:
            key = name.removeprefix("model.")
            if "rotary_emb" in key or (self.config.tie_word_embeddings and key == "lm_head.weight"):
                continue
            target, part = key, None
            for fragment, (fused, index) in self._fused.items():
                if fragment in key:
                    target, part = key.replace(fragment, fused), index
                    break
            if target not in params:
                raise ValueError(f"weights: unexpected tensor {name!r} for {self.config.architecture}")
            module = modules[target.rpartition(".")[0]]
            loader = getattr(module, "weight_loader", default_weight_loader)
            try:
                loader(params[target], tensor, part)
            except ValueError as exc:
                raise ValueError(f"weights: {name!r} {exc}") from None
            loaded.add((target, part))
        expected = {(n, part) for n in params for part in self._parts(n)}
        missing = sorted(f"{n}#{p}" if p is not None else n for n, p in expected - loaded)
        if missing:
            raise ValueError(f"weights: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    @staticmethod
    def _parts(name: str) -> tuple:
        if ".qkv_proj." in name:
            return ("q", "k", "v")
        return (0, 1) if ".gate_up_proj." in name else (None,)

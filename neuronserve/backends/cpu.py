"""The CPU reference backend: the model's forward run eagerly, in fp32 by default.

Eager mode skips padding (each step runs at its real size and the block table is trimmed to the
longest context), so small steps stay cheap. The traced and Neuron backends pad to the bucket.

``kernels="native"`` (the default) runs the linear layers and attention on the C++ kernels of
``neuronserve.ops`` (paged attention read in place, quantized GEMV/GEMM); ``"torch"`` keeps torch's
ops (the transposed-weight layout, and attention over gathered blocks) for comparison. Without a
built kernel library ``native`` falls back to ``torch`` with a warning.
"""

from __future__ import annotations

import torch

from neuronserve.backends.base import (
    Backend,
    ChunkModelRunner,
    ModelRunner,
    kv_cache_torch_dtype,
    register_backend,
)
from neuronserve.backends.cpu_layout import use_transposed_linears
from neuronserve.backends.hugepages import huge_page_zeros
from neuronserve.backends.inputs import (
    DecodeInputs,
    SeqChunk,
    StepInputs,
    build_step_inputs,
    check_token_ids,
    eager_attention_plan,
)
from neuronserve.config import CacheConfig, ModelConfig, SchedulerConfig
from neuronserve.core import SchedulerOutput
from neuronserve.model.llama import EagerAttentionPlan
from neuronserve.ops import KERNEL_CHOICES, native_available, use_native_linears
from neuronserve.ops.layers import use_native_decoder


class CPUModelRunner(ChunkModelRunner):
    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        scheduler_config: SchedulerConfig,
        cache_dtype: torch.dtype | None = None,
        kernels: str = "native",
    ) -> None:
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels: {kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")
        # What runs: "native" only where the library loaded (native_available warns once otherwise).
        self.kernels = "native" if kernels == "native" and native_available() else "torch"
        self.model = use_native_linears(model.eval()) if self.native else use_transposed_linears(model.eval())
        # Native: the decoder layers as one C call a step where the model allows (else per op).
        self.per_op_reason = use_native_decoder(self.model) if self.native else None
        self.model_config = model_config
        self.cache_config = cache_config
        self.scheduler_config = scheduler_config
        dtype = cache_dtype or kv_cache_torch_dtype(cache_config, next(model.parameters()).dtype)
        shape = model.kv_cache_shape(cache_config.num_blocks, cache_config.block_size)
        self.kv_cache = huge_page_zeros(shape, dtype)  # blocks scattered over it: fewer TLB misses
        self._gather_buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._decode_inputs = DecodeInputs(cache_config.block_size)

    def _workspace(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reused buffers the decode attention gathers K and V blocks into (see EagerAttentionPlan)."""
        if self._gather_buffers is None or self._gather_buffers[0].shape[0] < num_blocks:
            shape = (max(num_blocks, 64), *self.kv_cache.shape[3:])  # (blocks, kvh, block_size, hd)
            self._gather_buffers = (self.kv_cache.new_empty(shape), self.kv_cache.new_empty(shape))
        return self._gather_buffers

    @property
    def native(self) -> bool:
        return self.kernels == "native"

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """A decode-only step runs on persistent inputs (``DecodeInputs``); others from chunks."""
        inputs = self._decode_inputs.build(out)
        if inputs is None:
            return super().execute(out)
        plan = None if self.native else EagerAttentionPlan(num_decode_tokens=inputs.num_seqs)
        return self._run(inputs, plan)

    def run_chunks(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """The step of ``chunks`` (tensor-parallel workers call it directly)."""
        if not chunks:
            return torch.empty(0, self.model_config.vocab_size)
        check_token_ids(chunks, self.model_config.vocab_size)
        inputs = build_step_inputs(chunks, self.cache_config.block_size)
        plan = None if self.native else eager_attention_plan(chunks, self.cache_config.block_size)
        return self._run(inputs, plan)

    @torch.inference_mode()
    def _run(self, inputs: StepInputs, plan: EagerAttentionPlan | None) -> torch.Tensor:
        """``plan``: the torch path's split of attention; the native kernels need none."""
        if plan is None:
            plan = EagerAttentionPlan(
                paged=(inputs.block_tables, inputs.query_start_loc, inputs.context_lens)
            )
        else:
            plan.workspace = self._workspace(plan.num_decode_tokens * inputs.block_tables.shape[1])
        logits, _ = self.model(*inputs.as_args(), self.kv_cache, plan=plan)
        return logits[: inputs.num_logits]


@register_backend("cpu")
class CPUBackend(Backend):
    uses_kernels = True

    def build_runner(
        self, model, model_config, cache_config, scheduler_config, compile_config=None, kernels="native"
    ) -> ModelRunner:
        return CPUModelRunner(model, model_config, cache_config, scheduler_config, kernels=kernels)

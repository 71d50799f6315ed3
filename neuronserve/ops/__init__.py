"""The Python face of neuronserve's native CPU kernels (``kernels/``, C++17, built at install).

Each kernel is a ``torch.library`` op in the ``neuronserve`` namespace with a fake (meta)
implementation, and has a torch composite beside it (``*_reference``): the composite is what the
tests check the kernel against, and the model's traced, torch-xla and Neuron paths never leave it.
The eager CPU backend calls the ops (``kernels="native"``, the default) when the library loaded.

- ``write_kv`` / ``paged_attention``: the step's K/V written into their slots, and attention read
  in place through the block tables (fp32, int8 and fp8 caches; GQA; decode and prefill chunks).
- ``linear``: ``x @ W^T`` for fp32, int8 (per channel), fp8 e4m3 (per channel) and int4 (groups)
  weights with fp32 activations, and int8 with activations quantized on the fly on AVX-512 VNNI.

``neuronserve.ops.layers`` runs a model's whole stack of decoder layers on these kernels in one
call per step (the eager CPU backend's fast path; the per-op model is its reference).
"""

from neuronserve.ops._lib import best_isa, native_available
from neuronserve.ops.attention import (
    paged_attention,
    paged_attention_reference,
    write_kv,
    write_kv_reference,
)
from neuronserve.ops.dispatch import KERNEL_CHOICES, forced_isa, native_isa
from neuronserve.ops.linear import NativeLinear, linear, linear_reference, use_native_linears

__all__ = [
    "KERNEL_CHOICES",
    "NativeLinear",
    "best_isa",
    "forced_isa",
    "linear",
    "linear_reference",
    "native_available",
    "native_isa",
    "paged_attention",
    "paged_attention_reference",
    "use_native_linears",
    "write_kv",
    "write_kv_reference",
]

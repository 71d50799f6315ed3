"""The native ``neuronserve::linear`` op (kernels/gemm.cpp, gemm_vnni.cpp) against its torch reference.

Every weight format on every instruction set this CPU has (the kernels are forced down to scalar,
AVX2 and AVX-512 in turn), at shapes that hit the kernels' edges: M not a multiple of a tile, K not a
multiple of the vector width, odd N, int4 groups of any even size; the VNNI path against its own
definition (int8 activations, ``q8_activations``); ``NativeLinear`` against the layers it wraps; and
the argument checks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from neuronserve import ops
from neuronserve.ops import forced_isa
from neuronserve.ops.linear import (
    W_F32,
    W_FP8,
    W_I4,
    W_I8,
    NativeLinear,
    dequantize_weight,
    linear,
    linear_reference,
    pack_int8,
    q8_activations,
)
from neuronserve.quant.linear import FP8Linear, Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="native kernels not built")

ISA_ORDER = ("scalar", "avx2", "avx512")  # (avx512_vnni runs the avx512 kernels with fp32 activations)
BEST = ISA_ORDER.index(ops.best_isa().replace("_vnni", ""))
ISAS = ISA_ORDER[: BEST + 1]
HAS_VNNI = ops.best_isa() == "avx512_vnni"
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no AVX-512 VNNI")
WTYPES = {"f32": W_F32, "int8": W_I8, "fp8": W_FP8, "int4": W_I4}
# K values off the vector widths (the kernels' tails), SmolLM2's hidden size, and a long one
# with a remainder at every vector width.
K_ANY = (1, 3, 17, 40, 72, 90, 100, 576, 1000)
K_INT4 = (2, 40, 72, 90, 100, 576, 1000)  # even; groups drawn among their even divisors
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_weight(wtype: int, N: int, K: int, group_size: int, gen: torch.Generator) -> dict:
    """A weight in ``wtype``'s storage as ``neuronserve.quant`` makes it (fp8 and int8 from floats,
    so they hold no NaN codes), with its scales."""
    w = torch.randn(N, K, generator=gen)
    if wtype == W_F32:
        return {"weight": w, "scale": None, "minimum": None, "group_size": 0}
    if wtype == W_I8:
        s = w.abs().amax(1) / 127
        return {"weight": (w / s[:, None]).round().clamp(-127, 127).to(torch.int8), "scale": s,
                "minimum": None, "group_size": 0}  # fmt: skip
    if wtype == W_FP8:
        s = w.abs().amax(1) / 448
        return {"weight": (w / s[:, None]).to(torch.float8_e4m3fn), "scale": s,
                "minimum": None, "group_size": 0}  # fmt: skip
    groups = K // group_size
    return {
        "weight": torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen),
        "scale": torch.rand(N, groups, generator=gen) + 0.05,
        "minimum": torch.randn(N, groups, generator=gen),
        "group_size": group_size,
    }


def fp32_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What fp32 summation in another order may differ by: a few ulps of sum |x| |w| per output."""
    return 1e-5 * (x.double().abs() @ w.double().abs().t()).float() + 1e-6


@st.composite
def problems(draw):
    wtype = draw(st.sampled_from(list(WTYPES.values())))
    if wtype == W_I4:
        K = draw(st.sampled_from(K_INT4))
        group_size = draw(st.sampled_from([g for g in range(2, K + 1, 2) if K % g == 0]))
    else:
        K, group_size = draw(st.sampled_from(K_ANY)), 0
    M = draw(st.integers(1, 70))
    N = draw(st.integers(1, 70))
    return wtype, M, K, N, group_size, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("isa", ISAS)
@FAST
@given(problem=problems())
def test_linear_matches_the_reference_on_every_isa(isa, problem):
    wtype, M, K, N, group_size, with_bias, seed = problem
    gen = torch.Generator().manual_seed(seed)
    ws = make_weight(wtype, N, K, group_size, gen)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen) if with_bias else None
    with forced_isa(isa):
        y = linear(x, ws["weight"], wtype, ws["scale"], ws["minimum"], ws["group_size"], bias)
    ref = linear_reference(x, ws["weight"], wtype, ws["scale"], ws["minimum"], ws["group_size"], bias, None)
    w = dequantize_weight(ws["weight"], wtype, ws["scale"], ws["minimum"], ws["group_size"])
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert ((y - ref).abs() <= fp32_bound(x, w)).all(), (y - ref).abs().max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wtype", WTYPES.values(), ids=WTYPES.keys())
@pytest.mark.parametrize("M", [1, 4, 5, 64])  # GEMV, one x tile, a tail tile, many (int4: the panel)
@pytest.mark.parametrize("K, N", [(576, 963), (1536, 77)], ids=["qkv", "down"])
def test_smollm2_shape(isa, wtype, M, K, N):
    """Real layers' shapes: several threads' shares of W, and int4 in groups of 32 (the vector
    decode, in registers and into a panel)."""
    gen = torch.Generator().manual_seed(M)
    ws = make_weight(wtype, N, K, 32, gen)
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    with forced_isa(isa):
        y = linear(x, ws["weight"], wtype, ws["scale"], ws["minimum"], ws["group_size"], bias)
    ref = linear_reference(x, ws["weight"], wtype, ws["scale"], ws["minimum"], ws["group_size"], bias, None)
    w = dequantize_weight(ws["weight"], wtype, ws["scale"], ws["minimum"], ws["group_size"])
    assert ((y - ref).abs() <= fp32_bound(x, w)).all()


def test_zero_rows():
    y = linear(torch.empty(0, 40), torch.randn(7, 40), W_F32)
    assert y.shape == (0, 7)


# ------------------------------------------------------------------------------------ VNNI path
def vnni_problem(M, K, N, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    ws = make_weight(W_I8, N, K, 0, gen)
    ws["weight"][0, ::7] = -128  # the full int8 range (the quantizer stops at -127; a file need not)
    x = torch.randn(M, K, generator=gen) * torch.rand(M, K, generator=gen).pow(4) * 4  # uneven block scales
    x[0, :32] = 0  # an all-zero block (scale 0)
    bias = torch.randn(N, generator=gen) if with_bias else None
    return x, ws["weight"], ws["scale"], bias


@needs_vnni
@FAST
@given(M=st.integers(1, 70), blocks=st.integers(1, 20), N=st.integers(1, 70), with_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_vnni_path_computes_int8_activations(M, blocks, N, with_bias, seed):
    """Exactly q8_activations' rounding, then exact integer products: the same as the torch
    composite up to fp32 summation order."""
    K = 32 * blocks  # odd block counts: a lone last block in the kernel's 64-input steps
    x, w, scale, bias = vnni_problem(M, K, N, with_bias, seed)
    y = linear(x, w, W_I8, scale, None, 0, bias, int8_activations=True)
    xq, wf = q8_activations(x), dequantize_weight(w, W_I8, scale, None, 0)
    ref = F.linear(xq, wf, bias)
    assert ((y - ref).abs() <= fp32_bound(xq, wf)).all(), (y - ref).abs().max()


@needs_vnni
@pytest.mark.parametrize("M", [1, 3, 33])
def test_vnni_path_is_within_int8_rounding_of_the_exact_product(M):
    """Against fp32 activations: each input moves by at most half its block's step (max |x| / 254)."""
    K, N = 576, 200
    x, w, scale, bias = vnni_problem(M, K, N, True, M)
    y = linear(x, w, W_I8, scale, None, 0, bias, int8_activations=True)
    wf = dequantize_weight(w, W_I8, scale, None, 0)
    half_step = x.view(M, -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(M, K) / 254
    bound = half_step @ wf.abs().t() + fp32_bound(x, wf)
    assert ((y - F.linear(x, wf, bias)).abs() <= bound).all()


# ------------------------------------------------------------------------------------ NativeLinear
def layers(in_f: int, out_f: int):
    torch.manual_seed(in_f + out_f)
    base = nn.Linear(in_f, out_f)
    return {
        "fp32": base,
        "int8": Int8Linear.from_linear(base),
        "fp8": FP8Linear.from_linear(base),
        "int4": Int4Linear.from_linear(base, group_size=32),
    }


@pytest.mark.parametrize("kind", ["fp32", "int8", "fp8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 70, 200, 300])  # 300: fp32 and dequantized int8/fp8 via torch
def test_native_linear_equals_the_wrapped_layer(kind, rows):
    layer = layers(96, 80)[kind]  # (torch's packed int4 kernel, in Int4Linear, needs N % 16 == 0)
    native = NativeLinear(layer)
    x = torch.randn(2, rows, 96) if rows % 2 == 0 else torch.randn(rows, 96)
    with torch.no_grad():
        y, ref = native(x), layer(x)
        w = layer.weight if kind == "fp32" else layer.dequantize()
        exact = F.linear(x, w, layer.bias)
    assert y.shape == ref.shape
    # The layers' own forward may run bf16 activations (torch's packed kernels) and NativeLinear
    # int8 activations (VNNI): both within about 1% of the exact product.
    assert (y - ref).norm() / ref.norm() < 1e-2
    if not native.int8_activations:  # fp32 activations: exact up to order
        torch.testing.assert_close(y, exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", [i for i in ("scalar", "avx2", "avx512") if ISA_ORDER.index(i) <= BEST])
def test_int8_layers_built_under_a_forced_isa_run_on_it(isa):
    """NEURONSERVE_KERNEL_ISA / forced_isa below VNNI: int8 layers take fp32 activations there
    (else every call would be refused for want of VNNI)."""
    layer = layers(96, 80)["int8"]
    x = torch.randn(3, 96)
    with forced_isa(isa):
        native = NativeLinear(layer)
        y = native(x)
    assert not native.int8_activations
    torch.testing.assert_close(y, F.linear(x, layer.dequantize(), layer.bias), rtol=1e-4, atol=1e-4)
    if HAS_VNNI:  # asked for anyway, on a lower ISA: refused, naming the argument and the ISA
        with forced_isa(isa), pytest.raises(ValueError, match=f"^int8_activations: .* runs {isa}"):
            linear(x, layer.qweight, W_I8, layer.scale, None, 0, None, int8_activations=True)


def test_native_linear_shares_the_weights():
    layer = layers(64, 32)["int8"]
    native = NativeLinear(layer)
    assert native.weight.data_ptr() == layer.qweight.data_ptr()


@needs_vnni
@pytest.mark.parametrize("N", [1, 17, 40, 200])  # partial 16-column vectors and 32-column groups
def test_packed_int8_weights_give_the_bits_of_per_call_packing(N):
    """NativeLinear keeps VNNI-path weights packed (pack_int8): its calls give the bits of the op,
    which packs [N, K] weights per call; a row's bits do not depend on the rows sharing its call."""
    torch.manual_seed(N)
    layer = Int8Linear.from_linear(nn.Linear(96, N))  # K = 96: a lone last block in 64-input steps
    native = NativeLinear(layer)
    assert native.int8_activations and native.packed.numel() == -(-N // 16) * 16 * 96
    x = torch.randn(37, 96)
    with torch.no_grad():
        y = native(x)
        per_call = linear(x, layer.qweight, W_I8, layer.scale, None, 0, layer.bias, int8_activations=True)
        assert torch.equal(y, per_call)
        for rows in (slice(0, 1), slice(5, 7), slice(30, 37)):
            assert torch.equal(native(x[rows]), y[rows])


# ------------------------------------------------------------------------------------ bad input
@needs_vnni
@pytest.mark.parametrize(
    "weight",
    [torch.zeros(4, 40, dtype=torch.int8), torch.zeros(64, 4, dtype=torch.int8).t(), torch.zeros(4, 64)],
    ids=["K not in blocks of 32", "non-contiguous", "float32"],
)
def test_packing_refuses_weights_it_cannot_pack(weight):
    with pytest.raises(ValueError, match="^weight:"):
        pack_int8(weight)


@pytest.mark.parametrize(
    "change, name",
    [
        (lambda a: a.update(x=a["x"].double()), "x"),
        (lambda a: a.update(weight=a["weight"].to(torch.int16)), "weight"),
        (lambda a: a.update(weight=torch.zeros(40, 7, dtype=torch.int8).t()), "weight"),
        (lambda a: a.update(scale=a["scale"][:-1]), "scale"),
        (lambda a: a.update(scale=a["scale"].double()), "scale"),
    ],
    ids=["float64 x", "int16 weight", "non-contiguous weight", "short scale", "float64 scale"],
)
def test_bad_arguments_raise_naming_the_argument(change, name):
    args = {"x": torch.randn(3, 40), "weight": torch.zeros(7, 40, dtype=torch.int8), "wtype": W_I8,
            "scale": torch.ones(7)}  # fmt: skip
    change(args)
    with pytest.raises(ValueError, match=f"^{name}:"):
        linear(**args)


@pytest.mark.parametrize("group_size", [3, 6, 16])  # odd; even but not dividing 40 (twice)
def test_group_size_must_split_k_into_even_groups(group_size):
    N, K = 7, 40
    groups = K // group_size  # scales of the shape the checks in Python expect: the library refuses
    with pytest.raises(ValueError, match="^group_size:"):
        linear(torch.randn(2, K), torch.zeros(N, K // 2, dtype=torch.uint8), W_I4, torch.ones(N, groups),
               torch.zeros(N, groups), group_size)  # fmt: skip


@pytest.mark.skipif(HAS_VNNI, reason="checks the refusal on a CPU without VNNI")
def test_vnni_path_refused_without_vnni():
    w = torch.zeros(7, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="^int8_activations:"):
        linear(torch.randn(2, 64), w, W_I8, torch.ones(7), None, 0, None, int8_activations=True)


def test_group_size_zero_is_refused_naming_it():
    with pytest.raises(ValueError, match="^group_size:"):
        linear(torch.randn(2, 40), torch.zeros(7, 20, dtype=torch.uint8), W_I4, torch.ones(7, 1),
               torch.zeros(7, 1), 0)  # fmt: skip


def test_native_linear_checks_its_activations_on_the_direct_path():
    native = NativeLinear(layers(64, 32)["int8"])
    with pytest.raises(ValueError, match="^x:"):
        native(torch.randn(3, 64, dtype=torch.float64))
    x = torch.randn(2, 5, 64)[:, ::2]  # non-contiguous: copied, not refused
    torch.testing.assert_close(native(x), native(x.contiguous()))


def test_eager_calls_skip_the_dispatcher_but_whatever_watches_still_sees_the_op():
    """An eager CPU call runs the C library directly (the dispatcher costs ~7 us a call); under the
    profiler it goes through ``neuronserve::linear``, with the same result."""
    x, w = torch.randn(3, 64), torch.randn(32, 64)
    eager = linear(x, w)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled = linear(x, w)
    assert "neuronserve::linear" in {e.name for e in prof.events()}
    torch.testing.assert_close(profiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(eager, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_tensors_off_the_cpu_go_through_the_dispatcher_to_the_fake_impl():
    # (a meta tensor is a plain torch.Tensor too: it must not reach the C library)
    y = linear(torch.empty(3, 64, device="meta"), torch.empty(32, 64, device="meta"))
    assert y.device.type == "meta" and tuple(y.shape) == (3, 32)

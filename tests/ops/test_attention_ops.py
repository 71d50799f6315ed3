"""The native ``neuronserve::paged_attention`` and ``neuronserve::write_kv`` (kernels/attention.cpp)
against their torch references.

On every instruction set this CPU has (forced down to scalar, AVX2, AVX-512 and AVX-512 VNNI in
turn; VNNI computes an int8 cache's scores and values in int16 fixed point): random
batches mixing decode tokens, prefill chunks, zero-length sequences and padding tokens, over fp32,
int8 and fp8 caches, any GQA ratio and head_dim (the kernels' tails), block tables with junk past a
sequence's blocks; the key-partitioned (flash-decoding) path of long contexts; the K/V write byte for
byte, special values included; and the argument checks. Without the native library the ops are the
references themselves, so the comparisons still run (and pass trivially).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuronserve import ops
from neuronserve.ops import (
    forced_isa,
    paged_attention,
    paged_attention_reference,
    write_kv,
    write_kv_reference,
)

NATIVE = ops.native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="native kernels not built")
ISA_ORDER = ("scalar", "avx2", "avx512", "avx512_vnni")  # VNNI: an int8 cache's int16 path
ISAS = [isa for isa in ISA_ORDER if ISA_ORDER.index(isa) <= ISA_ORDER.index(ops.best_isa())]
DTYPES = (torch.float32, torch.int8, torch.float8_e4m3fn)
HEAD_DIMS = (1, 7, 24, 32, 64, 80, 96, 128)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_cache(shape, dtype, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache of ``shape`` in ``dtype`` and its per-head scales, dequantizing to values of about
    unit size (fp8: every byte but the two NaN codes, subnormals included)."""
    kvh = shape[2]
    if dtype == torch.float32:
        return torch.randn(shape, generator=gen), torch.ones(2, kvh)
    if dtype == torch.int8:
        cache = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)
        return cache, torch.rand(2, kvh, generator=gen) * 0.02 + 0.005
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x7E  # no NaN in the cache: it would make the outputs NaN
    return raw.view(torch.float8_e4m3fn), torch.rand(2, kvh, generator=gen) * 0.004 + 0.001


def make_batch(seqs, kvh, group, hd, block_size, dtype, seed, *, lead=0, pad=0, junk="random", shared=False):
    """Inputs of a paged_attention call. seqs: (q_len, context) per sequence; lead / pad: tokens
    before the first sequence's and after the last's (owned by none); junk: what the block-table
    entries past a sequence's blocks hold ("random" valid blocks, "zero", or "negative" -1, which
    nothing may read); shared: blocks drawn with repeats (prefix sharing) instead of distinct."""
    gen = torch.Generator().manual_seed(seed)
    B = len(seqs)
    needed = [-(-ctx // block_size) for _, ctx in seqs]
    max_blocks = max([1, *needed]) + int(torch.randint(0, 3, (1,), generator=gen))
    num_blocks = max(1, sum(needed)) + 2
    cache, kv_scale = random_cache((2, num_blocks, kvh, block_size, hd), dtype, gen)
    if junk == "random":
        tables = torch.randint(0, num_blocks, (B, max_blocks), generator=gen)
    else:
        tables = torch.full((B, max_blocks), 0 if junk == "zero" else -1)
    order = torch.randperm(num_blocks, generator=gen)
    used = 0
    for b, n in enumerate(needed):
        if seqs[b][0] == 0 and junk == "negative":
            continue  # a sequence with no query tokens: nothing may read its table
        if shared:
            tables[b, :n] = torch.randint(0, num_blocks, (n,), generator=gen)
        else:
            tables[b, :n] = order[used : used + n]
            used += n
    qsl = torch.tensor([lead] + [q for q, _ in seqs]).cumsum(0)
    ctx = torch.tensor([c for _, c in seqs], dtype=torch.int64)
    q = torch.randn(int(qsl[-1]) + pad, kvh * group, hd, generator=gen)
    return q, cache, tables, qsl, ctx, kv_scale, hd**-0.5


def tolerance(cache, kv_scale, isa: str = "avx512") -> float:
    """fp32 in another order: a few ulps of the values averaged (and for int8 / fp8, of scores that
    the reference computes from dequantized keys, the kernel with the scale folded into q). An int8
    cache on VNNI computes in int16 fixed point: q and each chunk's probabilities rounded to 2^-15
    of their largest element, measured up to 8.0e-5 of the values over 400 random batches (the
    int8 cache's own rounding is ~4e-3 of them)."""
    values = (cache.float() * kv_scale[:, None, :, None, None]).abs().max().item()
    if cache.dtype == torch.int8 and isa == "avx512_vnni":
        return 1.5e-4 * max(1.0, values)
    return (2e-5 if cache.dtype == torch.float32 else 6e-5) * max(1.0, values)


def check_attention(args, isas=ISAS):
    q, cache, tables, qsl, ctx, kv_scale, scale = args
    expected = paged_attention_reference(*args)
    for isa in isas:
        with forced_isa(isa):
            out = paged_attention(*args)
        assert out.shape == q.shape and out.dtype == torch.float32
        torch.testing.assert_close(
            out, expected, rtol=0, atol=tolerance(cache, kv_scale, isa), msg=lambda m, isa=isa: f"{isa}: {m}"
        )
        owned = slice(int(qsl[0]), int(qsl[-1]))
        assert not out[: owned.start].any() and not out[owned.stop :].any(), isa  # unowned tokens: zeros


# ------------------------------------------------------------------------------------ attention
sequence = st.one_of(
    st.tuples(st.just(1), st.integers(1, 90)),  # decode
    st.tuples(st.integers(2, 40), st.integers(0, 60)).map(lambda t: (t[0], t[0] + t[1])),  # prefill chunk
    st.tuples(st.just(0), st.integers(0, 30)),  # no query tokens this step
)


@FAST
@given(
    seqs=st.lists(sequence, min_size=0, max_size=5),
    kvh=st.integers(1, 4),
    group=st.integers(1, 8),
    hd=st.sampled_from(HEAD_DIMS),
    block_size=st.sampled_from((1, 3, 16, 32)),
    dtype=st.sampled_from(DTYPES),
    lead=st.integers(0, 2),
    pad=st.integers(0, 3),
    junk=st.sampled_from(("random", "zero", "negative")),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_paged_attention_matches_the_reference(
    seqs, kvh, group, hd, block_size, dtype, lead, pad, junk, shared, seed
):
    args = make_batch(
        seqs, kvh, group, hd, block_size, dtype, seed, lead=lead, pad=pad, junk=junk, shared=shared
    )
    check_attention(args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_smollm2_shapes_mixed_decode_and_prefill(dtype):
    """SmolLM2-135M's heads (9 query, 3 KV, head_dim 64, blocks of 16): decode tokens at block
    boundaries and a prefill chunk, in one call."""
    seqs = [(1, 15), (1, 16), (1, 17), (1, 300), (37, 37), (5, 129), (0, 40), (1, 1)]
    check_attention(make_batch(seqs, 3, 3, 64, 16, dtype, seed=1, pad=3))


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "seqs, kvh, group, hd",
    [
        ([(1, 2000)], 3, 3, 64),  # one long decode: its keys split into partitions, merged after
        ([(3, 1500), (1, 700)], 2, 4, 80),  # a few tokens of speculation over a long context
        ([(390, 400)], 1, 1, 8),  # a prefill whose tiles outspan a partition: rows with no key in it
    ],
)
def test_long_contexts_split_over_threads(two_threads, seqs, kvh, group, hd, dtype):
    check_attention(make_batch(seqs, kvh, group, hd, 16, dtype, seed=2))


@pytest.mark.skipif(ops.best_isa() != "avx512_vnni", reason="needs AVX-512 VNNI")
def test_int8_cache_on_vnni_takes_the_int16_path_batch_invariantly():
    """On VNNI an int8 cache with head_dim a multiple of 32 is read in int16 fixed point (other bits
    than the fp32 path's, as close as the tolerance says); a decode row's bits are the same alone
    and beside a prefill; other head sizes and caches keep the fp32 path."""
    args = make_batch([(1, 300), (20, 40)], 3, 3, 64, 16, torch.int8, seed=5)
    with forced_isa("avx512"):
        fp32_path = paged_attention(*args)
    with forced_isa("avx512_vnni"):
        int16_path = paged_attention(*args)
        q, cache, tables, qsl, ctx, kv_scale, scale = args
        alone = paged_attention(q[:1], cache, tables[:1], qsl[:2], ctx[:1], kv_scale, scale)
    assert not torch.equal(int16_path, fp32_path)
    torch.testing.assert_close(int16_path, fp32_path, rtol=0, atol=tolerance(cache, kv_scale, "avx512_vnni"))
    assert torch.equal(alone[0], int16_path[0])
    for hd, dtype in ((24, torch.int8), (64, torch.float8_e4m3fn), (64, torch.float32)):
        args = make_batch([(1, 70), (9, 30)], 2, 4, hd, 16, dtype, seed=6)
        with forced_isa("avx512"):
            expected = paged_attention(*args)
        with forced_isa("avx512_vnni"):
            assert torch.equal(paged_attention(*args), expected), (hd, dtype)


def test_fp8_nan_bytes_reach_the_outputs_the_reference_makes_nan():
    """fp8 chunks without a NaN byte skip the per-element NaN fix-up; a chunk with one (in K or in
    V) is read exactly, so its NaN reaches the same outputs as in the reference: a NaN score makes
    its rows NaN (the SIMD exp's clamp lets it through), a NaN value its element."""
    args = make_batch([(1, 40), (1, 70), (3, 33)], 2, 3, 64, 16, torch.float8_e4m3fn, seed=7)
    q, cache, tables, qsl, ctx, kv_scale, scale = args
    atol = tolerance(cache, kv_scale)  # (before the NaNs)
    raw = cache.view(torch.uint8)
    raw[0, tables[0, 1], 1, 3, 5] = 0x7F  # K: sequence 0, key 19, KV head 1
    raw[1, tables[1, 2], 0, 7, 9] = 0xFF  # V: sequence 1, key 39, KV head 0, element 9
    expected = paged_attention_reference(*args)
    assert expected[0, 3:6].isnan().all() and expected[1, 0:3, 9].isnan().all()
    assert expected.isnan().sum() == 3 * 64 + 3
    for isa in ISAS:
        with forced_isa(isa):
            out = paged_attention(*args)
        torch.testing.assert_close(
            out, expected, rtol=0, atol=atol, equal_nan=True, msg=lambda m, isa=isa: f"{isa}: {m}"
        )


def test_fp8_subnormals_with_denormals_flushed():
    """fp8 subnormals are read exactly even where the thread flushes fp32 denormals (DAZ/FTZ)."""
    args = make_batch([(1, 40), (4, 33)], 2, 3, 24, 16, torch.float8_e4m3fn, seed=3)
    cache = args[1].view(torch.uint8)
    cache &= 0x87  # exponent field 0: every value a subnormal (or zero)
    expected = paged_attention_reference(*args)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for isa in ISAS:
            with forced_isa(isa):
                torch.testing.assert_close(
                    paged_attention(*args), expected, rtol=0, atol=1e-5, msg=lambda m, isa=isa: f"{isa}: {m}"
                )
    finally:
        torch.set_flush_denormal(False)


# ------------------------------------------------------------------------------------ write_kv
def fp8_midpoints() -> torch.Tensor:
    """Halfway between consecutive e4m3fn values (the round-to-nearest-even ties), both signs."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (codes[1:] + codes[:-1]) / 2
    return torch.cat([mids, -mids])


def special_values(n: int, gen: torch.Generator) -> torch.Tensor:
    """A mix that hits every rounding and clamping case of the int8 and fp8 encodings, as values
    already divided by their scale: wide and narrow uniforms, int8 and fp8 ties, fp8 subnormals,
    +-0, +-inf, around +-127 and +-448, and random bit patterns (huge, tiny, denormal, NaN)."""
    half = torch.arange(-130, 130) + 0.5
    fixed = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 127.0, 127.4, 127.5, 128.0, 447.0, 448.0,
                          449.0, 464.0, 480.0, 500.0, 2.0**-6, 2.0**-7, 2.0**-9, 2.0**-10, 1.5 * 2.0**-10,
                          2.0**-11, 1e-30, 1e-40])  # fmt: skip
    fixed = torch.cat([fixed, -fixed])
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int32).view(torch.float32)
    pool = torch.cat([
        (torch.rand(n, generator=gen) - 0.5) * 1200,
        (torch.rand(n, generator=gen) - 0.5) * 2.0**-4,
        half, fp8_midpoints(), fixed, bits,
    ])  # fmt: skip
    return pool[torch.randint(0, pool.numel(), (n,), generator=gen)]


@FAST
@given(
    tokens=st.integers(0, 40),
    kvh=st.integers(1, 4),
    hd=st.sampled_from(HEAD_DIMS),
    block_size=st.sampled_from((1, 5, 16)),
    dtype=st.sampled_from(DTYPES),
    pow2_scale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_write_kv_is_byte_exact(tokens, kvh, hd, block_size, dtype, pow2_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-tokens // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]  # distinct: index_copy_'s rule
    # Powers of two divide exactly, so the ties and thresholds above reach the rounding as they are.
    if pow2_scale:
        kv_scale = 2.0 ** torch.randint(-8, 3, (2, kvh), generator=gen).float()
    else:
        kv_scale = torch.rand(2, kvh, generator=gen) * 0.05 + 1e-3
    k, v = (
        special_values(tokens * kvh * hd, gen).view(tokens, kvh, hd) * kv_scale[i][:, None] for i in (0, 1)
    )
    if dtype == torch.int8:  # NaN -> int8 is undefined in C++: torch's own result is platform-dependent
        k, v = k.nan_to_num(nan=3.0), v.nan_to_num(nan=-3.0)
    initial, _ = random_cache((2, num_blocks, kvh, block_size, hd), dtype, gen)
    expected = initial.clone()
    write_kv_reference(k, v, expected, slots, kv_scale)
    for isa in ISAS:
        cache = initial.clone()
        with forced_isa(isa):
            write_kv(k, v, cache, slots, kv_scale)
        raw, want = (
            t.view(torch.uint8) if t.dtype != torch.float32 else t.view(torch.int32)
            for t in (cache, expected)
        )
        mismatch = (raw != want).nonzero()
        assert mismatch.numel() == 0, (
            f"{isa}: {len(mismatch)} elements differ, first at {mismatch[0].tolist()}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_then_attend_a_prefill(two_threads, dtype):
    """A long prefill's K/V written (over threads) then attended: the model's order of calls."""
    gen = torch.Generator().manual_seed(4)
    T, kvh, group, hd, bs = 600, 3, 3, 64, 16
    cache = torch.zeros(2, T // bs + 4, kvh, bs, hd).to(dtype)
    kv_scale = (
        torch.rand(2, kvh, generator=gen) * 0.02 + 0.01 if dtype != torch.float32 else torch.ones(2, kvh)
    )
    k, v = torch.randn(T, kvh, hd, generator=gen), torch.randn(T, kvh, hd, generator=gen)
    tables = torch.randperm(cache.shape[1], generator=gen)[None]
    slots = (tables[0, torch.arange(T) // bs] * bs + torch.arange(T) % bs).contiguous()
    expected_cache = cache.clone()
    write_kv_reference(k, v, expected_cache, slots, kv_scale)
    write_kv(k, v, cache, slots, kv_scale)
    assert torch.equal(cache.view(torch.uint8), expected_cache.view(torch.uint8))
    q = torch.randn(T, kvh * group, hd, generator=gen)
    check_attention((q, cache, tables, torch.tensor([0, T]), torch.tensor([T]), kv_scale, hd**-0.5))


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
def test_write_kv_layout(native):
    """The documented layout: slot s of head h is kv_cache[:, s // block_size, h, s % block_size]."""
    if native and ops.attention._lib.LIB is None:
        pytest.skip("native kernels not built")
    kvh, bs, hd, num_blocks = 3, 4, 8, 5
    slots = torch.tensor([0, 7, 13, 18])
    k = torch.arange(len(slots) * kvh * hd, dtype=torch.float32).view(len(slots), kvh, hd)
    v = -k
    cache, scale = torch.zeros(2, num_blocks, kvh, bs, hd), torch.ones(2, kvh)
    (write_kv if native else write_kv_reference)(k, v, cache, slots, scale)
    for t, s in enumerate(slots.tolist()):
        for h in range(kvh):
            assert torch.equal(cache[0, s // bs, h, s % bs], k[t, h])
            assert torch.equal(cache[1, s // bs, h, s % bs], v[t, h])
    assert int((cache != 0).sum()) == 2 * k.numel() - 2  # nothing else written (k[0, 0, 0] is 0)


# ------------------------------------------------------------------------------------ checks
def good_call():
    return list(make_batch([(1, 20), (3, 3)], 2, 2, 16, 4, torch.int8, seed=5))


@needs_native
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(0, a[0].double()), "^q: dtype"),
        (lambda a: a.__setitem__(0, a[0][:, :, :8]), "^q: shape"),
        (lambda a: a.__setitem__(1, a[1].float().bfloat16()), "^kv_cache: dtype"),
        (
            lambda a: a.__setitem__(1, a[1].transpose(1, 2).contiguous().transpose(1, 2)),
            "^kv_cache: must be contiguous",
        ),
        (lambda a: a.__setitem__(2, a[2].int()), "^block_tables: dtype"),
        (lambda a: a[2].__setitem__((0, 1), 1000), "^block_tables: block 1000"),
        (lambda a: a[2].__setitem__((1, 0), -1), "^block_tables: block -1"),
        (lambda a: a.__setitem__(4, torch.tensor([20, 100])), "^context_lens: sequence 1"),
        # fewer tokens than it has new ones
        (lambda a: a.__setitem__(4, torch.tensor([20, 2])), "^context_lens: sequence 1"),
        (lambda a: a.__setitem__(3, torch.tensor([0, 1, 9])), "^query_start_loc: sequence 1"),
        (lambda a: a.__setitem__(5, torch.ones(2, 3)), "^kv_scale"),
    ],
)
def test_paged_attention_rejects_bad_arguments(change, match):
    args = good_call()
    paged_attention(*args)  # the unchanged call is fine
    change(args)
    with pytest.raises(ValueError, match=match):
        paged_attention(*args)


@needs_native
def test_write_kv_rejects_bad_arguments():
    cache = torch.zeros(2, 3, 2, 4, 16, dtype=torch.int8)
    k = v = torch.randn(2, 2, 16)
    scale = torch.ones(2, 2)
    with pytest.raises(ValueError, match="^slot_mapping: slot 12"):
        write_kv(k, v, cache, torch.tensor([0, 12]), scale)
    with pytest.raises(ValueError, match="^slot_mapping: slot -1"):
        write_kv(k, v, cache, torch.tensor([-1, 0]), scale)
    with pytest.raises(ValueError, match="^k: dtype"):
        write_kv(k.double(), v, cache, torch.tensor([0, 1]), scale)
    with pytest.raises(ValueError, match="^kv_cache: dtype"):
        write_kv(k, v, cache.float().bfloat16(), torch.tensor([0, 1]), scale)
    with pytest.raises(ValueError, match="^kv_cache: must be contiguous"):
        write_kv(k, v, cache.transpose(1, 2).contiguous().transpose(1, 2), torch.tensor([0, 1]), scale)


def test_tensors_off_the_cpu_go_through_the_dispatcher_to_the_fake_impls():
    # (meta tensors are plain torch.Tensors too: they must not reach the C library)
    meta = {"device": "meta"}
    q = torch.empty(2, 4, 16, **meta)
    cache, scale = torch.empty(2, 5, 2, 4, 16, **meta), torch.empty(2, 2, **meta)
    tables = torch.empty(2, 3, dtype=torch.int64, **meta)
    qsl, ctx = torch.empty(3, dtype=torch.int64, **meta), torch.empty(2, dtype=torch.int64, **meta)
    out = paged_attention(q, cache, tables, qsl, ctx, scale, 0.25)
    assert out.device.type == "meta" and out.shape == q.shape
    k = torch.empty(2, 2, 16, **meta)
    slots = torch.empty(2, dtype=torch.int64, **meta)
    write_kv(k, k, cache, slots, scale)  # (returns nothing: what it checks is that it does not crash)

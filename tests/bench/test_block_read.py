"""benchmarks/block_read.py: the no-arithmetic read behind cpu_kernels.py's attention ceiling must
read exactly the rows one attention call reads, each once, or its figure means nothing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.bench.conftest import load_benchmark

block_read = load_benchmark("block_read")

DTYPES = [torch.float32, torch.int8, torch.float8_e4m3fn]


@pytest.fixture(scope="module")
def reader():
    loaded = block_read.load()
    if isinstance(loaded, str):
        pytest.skip(f"block reader not built: {loaded}")
    return loaded


def random_cache(dtype, blocks, kv_heads, block, head_dim):
    if dtype == torch.int8:
        return torch.randint(-128, 128, (2, blocks, kv_heads, block, head_dim), dtype=torch.int8)
    return torch.randn(2, blocks, kv_heads, block, head_dim).to(dtype)


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    kv_heads=st.integers(1, 4),
    block=st.integers(1, 20),
    head_dim=st.sampled_from([8, 24, 64, 80, 128]),
    num_seqs=st.integers(1, 6),
    chunk=st.sampled_from([1, 16, 32]),
    work=st.sampled_from([0, 0, 1, 8, 13]),
    seed=st.integers(0, 2**16),
)
def test_reads_exactly_the_calls_rows(reader, dtype, kv_heads, block, head_dim, num_seqs, chunk, work, seed):
    g = torch.Generator().manual_seed(seed)
    per_seq = 4
    blocks = num_seqs * per_seq + 3
    torch.manual_seed(seed)
    cache = random_cache(dtype, blocks, kv_heads, block, head_dim)
    tables = (torch.randperm(blocks - 1, generator=g) + 1)[: num_seqs * per_seq].view(num_seqs, per_seq)
    ctx = torch.randint(1, per_seq * block + 1, (num_seqs,), generator=g)
    # The arithmetic stand-in (work) must not change what is read.
    assert reader.read(cache, tables, ctx, chunk, work) == block_read.expected_xor(cache, tables, ctx)


def test_a_row_left_out_or_read_twice_changes_the_checksum(reader):
    torch.manual_seed(0)
    cache = random_cache(torch.int8, 9, 3, 16, 64)
    tables = torch.tensor([[3, 1], [7, 2]])
    full = torch.tensor([32, 20])
    got = reader.read(cache, tables, full, 16)
    assert got == block_read.expected_xor(cache, tables, full)
    assert got != block_read.expected_xor(cache, tables, torch.tensor([32, 19]))
    assert got != block_read.expected_xor(cache, tables, torch.tensor([31, 20]))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c, t, n: (c[0], t, n), "cache"),
        (lambda c, t, n: (c, t.int(), n), "int64"),
        (lambda c, t, n: (c, t, n + 100), "context_lens"),
        (lambda c, t, n: (c, t + 50, n), "tables"),
        (lambda c, t, n: (c[..., :3], t, n), "cache"),
    ],
)
def test_bad_input_names_the_argument(reader, change, field):
    cache = torch.zeros(2, 9, 3, 16, 64, dtype=torch.int8)
    tables, ctx = torch.tensor([[3, 1]]), torch.tensor([20])
    with pytest.raises(ValueError, match=field):
        reader.read(*change(cache, tables, ctx), 16)


def test_negative_work_is_refused(reader):
    cache = torch.zeros(2, 9, 3, 16, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="work"):
        reader.read(cache, torch.tensor([[3, 1]]), torch.tensor([20]), 16, -1)


def test_the_overlap_sweeps_70_percent_point_is_interpolated():
    curve = [
        {"warm_ms": 0.15, "cold_fraction": 0.82},
        {"warm_ms": 0.17, "cold_fraction": 0.76},
        {"warm_ms": 0.22, "cold_fraction": 0.68},
        {"warm_ms": 0.29, "cold_fraction": 0.60},
    ]
    assert block_read.warm_at_fraction(curve, 0.7) == pytest.approx(0.17 + 0.75 * 0.05, abs=1e-3)
    assert block_read.warm_at_fraction(curve, 0.9) is None  # never reached
    assert block_read.warm_at_fraction(curve, 0.5) is None  # never fallen to

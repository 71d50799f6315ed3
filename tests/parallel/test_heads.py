"""Head layouts: every query head lands exactly once, beside its own KV head, in equal shapes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuronserve.config import ParallelConfig
from neuronserve.parallel.heads import HeadLayout


@given(
    num_kv=st.integers(1, 16),
    group=st.integers(1, 8),
    tp=st.integers(1, 32),
)
def test_every_query_head_is_placed_once_beside_its_kv_head(num_kv, group, tp):
    layout = HeadLayout(num_kv * group, num_kv, tp)
    placed = []
    for rank in range(tp):
        q_heads, kv_heads = layout.q_heads(rank), layout.kv_heads(rank)
        assert len(q_heads) == layout.q_per_rank and len(kv_heads) == layout.kv_per_rank
        for i, q in enumerate(q_heads):
            if q is not None:
                assert q // group == kv_heads[i // layout.q_per_kv]  # reads its own KV head
                placed.append(q)
    assert sorted(placed) == list(range(num_kv * group))
    assert layout.padded_num_heads == tp * layout.q_per_rank >= num_kv * group
    if num_kv % tp == 0:  # the divisible case needs no padding and no replication
        assert layout.padded_num_heads == num_kv * group and layout.num_kv_slots == num_kv


def test_smollm2_layouts():
    tp2 = HeadLayout(9, 3, 2)  # 3 KV heads do not divide by 2: 4 KV slots, 12 query heads
    assert (tp2.q_per_rank, tp2.kv_per_rank) == (6, 2)
    assert tp2.kv_heads(0) == [0, 0] and tp2.kv_heads(1) == [1, 2]
    assert tp2.q_heads(0) == [0, 1, None, 2, None, None]
    assert tp2.q_heads(1) == [3, 4, 5, 6, 7, 8]
    tp4 = HeadLayout(9, 3, 4)  # more ranks than KV heads: replicate, one KV head per rank
    assert (tp4.q_per_rank, tp4.kv_per_rank, tp4.padded_num_heads) == (3, 1, 12)
    assert [tp4.kv_heads(r) for r in range(4)] == [[0], [0], [1], [2]]
    assert (
        "3 zero query heads (33% more" in tp4.describe()
        and "1 replicated KV heads (33% more" in tp4.describe()
    )


def test_llama3_8b_at_tp24_pads_32_heads_to_48():
    layout = HeadLayout(32, 8, 24)
    assert (layout.q_per_rank, layout.kv_per_rank, layout.padded_num_heads, layout.num_kv_slots) == (
        2,
        1,
        48,
        24,
    )
    assert HeadLayout(32, 8, 8).padded_num_heads == 32  # divisible: no padding


@pytest.mark.parametrize(
    ("target", "tp", "message"),
    [
        ("inf2", 3, "3 is not a degree inf2 supports; choose one of 1, 2, 4, 8, 24"),
        ("trn1", 4, "choose one of 1, 2, 8, 16, 32"),
        ("trn2", 65, "choose one of 1-64"),
        ("inf2.xlarge", 8, "exceeds the 2 NeuronCores of inf2.xlarge; inf2.24xlarge or inf2.48xlarge"),
        ("p5.48xlarge", 1, "target: 'p5.48xlarge' is not a Neuron instance"),
        (None, 0, "tensor_parallel_size: must be >= 1"),
    ],
)
def test_neuron_tp_degrees_are_validated(target, tp, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        ParallelConfig(tp, target)


@pytest.mark.parametrize(
    ("target", "tp"), [("inf2.48xlarge", 24), ("trn1n.32xlarge", 32), ("trn2", 64), ("inf2", 8)]
)
def test_supported_neuron_degrees_pass(target, tp):
    assert ParallelConfig(tp, target).tensor_parallel_size == tp

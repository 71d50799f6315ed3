import pytest

from neuronserve.core import PAD_BLOCK_ID, BlockManager, Request


def computed_request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    r = Request(rid, tokens, max_tokens=1, cache_salt=salt)
    return r


def admit(bm: BlockManager, r: Request) -> int:
    """Admit a request the way the scheduler does and mark all its tokens computed."""
    hits = bm.find_cached_prefix(r)
    assert bm.allocate(r, r.num_tokens - len(hits) * bm.block_size, hits)
    r.num_computed_tokens = r.num_tokens
    bm.cache_full_blocks(r)
    return len(hits)


def test_allocation_never_hands_out_the_pad_block_and_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Request("a", list(range(12)), max_tokens=1)
    assert bm.allocate(a, 12)
    assert a.block_ids == [1, 2, 3] and PAD_BLOCK_ID not in a.block_ids
    b = Request("b", [1], max_tokens=1)
    free_before = bm.num_free_blocks
    assert not bm.allocate(b, 1)
    assert b.block_ids == [] and bm.num_free_blocks == free_before == 0
    bm.check_integrity()
    bm.free(a)
    assert bm.num_free_blocks == 3 and a.block_ids == []
    bm.check_integrity()


def test_allocate_grows_a_table_only_when_a_block_fills():
    bm = BlockManager(num_blocks=8, block_size=4)
    r = Request("r", [1, 2, 3], max_tokens=5)
    assert bm.allocate(r, 3) and len(r.block_ids) == 1
    r.num_computed_tokens = 3
    assert bm.allocate(r, 1) and len(r.block_ids) == 1  # the 4th token still fits in block 1
    r.num_computed_tokens = 4
    assert bm.allocate(r, 1) and len(r.block_ids) == 2
    assert bm.num_free_blocks == 5


def test_shared_prefix_is_reused_and_counted_by_reference():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = computed_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert admit(bm, a) == 0
    b = computed_request("b", list(range(8)) + [99, 98, 97])
    assert admit(bm, b) == 2
    assert b.block_ids[:2] == a.block_ids[:2]
    assert bm.ref_counts[a.block_ids[0]] == 2
    bm.check_integrity()


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, computed_request("a", list(range(8))))
    hits = bm.find_cached_prefix(computed_request("b", list(range(8))))
    assert len(hits) == 1  # 7 tokens may hit: one full block


def test_salt_isolates_tenants():
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, computed_request("a", list(range(9)), salt="tenant-1"))
    assert admit(bm, computed_request("b", list(range(9)), salt="tenant-2")) == 0
    assert admit(bm, computed_request("c", list(range(9)), salt="tenant-1")) == 2


def test_free_is_tail_first_and_eviction_is_least_recently_freed():
    bm = BlockManager(num_blocks=5, block_size=4)  # usable blocks 1..4
    a = computed_request("a", list(range(13)))
    admit(bm, a)
    assert a.block_ids == [1, 2, 3, 4]
    bm.free(a)
    # Tail first: block 4 (partial, never cached) then 3, 2, 1 join the free queue in that order.
    assert list(bm.free_blocks) == [4, 3, 2, 1]
    x = Request("x", [50], max_tokens=1)
    assert bm.allocate(x, 1) and x.block_ids == [4]
    y = Request("y", [60], max_tokens=1)
    assert bm.allocate(y, 1) and y.block_ids == [3]  # evicts a's third block first
    # The head of a's prefix survives: blocks 1 and 2 still hit, block 3 does not.
    assert bm.find_cached_prefix(computed_request("a2", list(range(13)))) == [1, 2]
    bm.check_integrity()


def test_reusing_a_free_cached_block_takes_it_out_of_the_free_queue():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = computed_request("a", list(range(8)) + [1])
    admit(bm, a)
    bm.free(a)
    b = computed_request("b", list(range(8)) + [2])
    assert admit(bm, b) == 2
    assert 1 not in bm.free_blocks and 2 not in bm.free_blocks
    bm.free(b)
    assert list(bm.free_blocks)[-2:] == [2, 1]  # most recently freed at the end
    bm.check_integrity()


def test_check_integrity_catches_a_leaked_reference():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Request("a", [1, 2], max_tokens=1)
    bm.allocate(a, 2)
    bm.ref_counts[a.block_ids[0]] += 1
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check_integrity()


def test_check_integrity_catches_a_block_both_free_and_owned():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Request("a", [1, 2], max_tokens=1)
    bm.allocate(a, 2)
    bm.free_blocks[a.block_ids[0]] = None
    with pytest.raises(AssertionError, match="free=True"):
        bm.check_integrity()

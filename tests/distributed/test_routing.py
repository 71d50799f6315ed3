"""The routing policy on its own (no Ray): prefix hashes, the ring, bounded load, fallbacks."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronserve.distributed.routing import (
    MAX_BLOCKS,
    HashRing,
    PrefixAwarePolicy,
    RoundRobinPolicy,
    least_outstanding,
    make_policy,
    prefix_hashes,
    routing_text,
)

SYSTEM = "You are a shopping assistant for an outdoor store. Answer briefly and cite products. " * 3


def chat(system: str, *turns: str) -> dict:
    return {
        "messages": [{"role": "system", "content": system}, *({"role": "user", "content": t} for t in turns)]
    }


@given(st.text(max_size=600), st.text(max_size=200), st.integers(1, 80))
def test_hashes_are_chained_over_full_blocks(a, b, block_chars):
    ha, hab = prefix_hashes(a, block_chars), prefix_hashes(a + b, block_chars)
    assert len(ha) == min(len(a.encode()) // block_chars, MAX_BLOCKS)  # (long texts: the first 64)
    assert hab[: len(ha)] == ha  # a longer prompt extends, never changes, its prefix's hashes


def test_a_different_early_block_changes_every_later_hash():
    x, y = prefix_hashes("A" * 64 + "B" * 128), prefix_hashes("C" * 64 + "B" * 128)
    assert len(x) == 3 and all(p != q for p, q in zip(x, y))


def test_routing_text_of_chat_and_completion_bodies():
    assert routing_text(chat("sys", "hi")).startswith("system\nsys")
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]
    }
    assert "ab" in routing_text(parts)
    assert routing_text({"prompt": "hello"}) == "hello" == routing_text({"prompt": ["hello"]})
    assert routing_text({"prompt": [1, 2, 3]}) == "[1, 2, 3]"
    assert routing_text({"model": "x"}) == ""


@settings(max_examples=50)
@given(st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=8, unique=True), st.binary(min_size=1))
def test_ring_moves_only_the_removed_replicas_keys(replicas, key):
    full, fewer = HashRing(replicas), HashRing(replicas[1:])
    assert sorted(full.preference(key)) == sorted(replicas)
    if full.preference(key)[0] != replicas[0]:
        assert fewer.preference(key)[0] == full.preference(key)[0]


def test_ring_spreads_keys_over_replicas():
    ring = HashRing(["a", "b"], vnodes=64)
    owners = Counter(ring.preference(str(i).encode())[0] for i in range(2000))
    assert min(owners.values()) > 600


def test_a_conversation_returns_to_its_replica_and_shared_system_prompts_meet():
    policy, replicas, idle = PrefixAwarePolicy(), ["r0", "r1"], {"r0": 0, "r1": 0}
    first = policy.choose(replicas, idle, prefix_hashes(routing_text(chat(SYSTEM, "tents?"))))
    # The same system prompt, another question: the first block's ring position decides.
    assert policy.choose(replicas, idle, prefix_hashes(routing_text(chat(SYSTEM, "boots?")))) == first
    # A follow-up turn extends the conversation: the longest recorded prefix decides.
    follow_up = prefix_hashes(routing_text(chat(SYSTEM, "tents?", "which is lighter?")))
    assert policy.choose(replicas, idle, follow_up) == first


def test_an_overloaded_replica_is_passed_over_then_least_outstanding():
    policy = PrefixAwarePolicy(load_factor=1.25)
    hashes = prefix_hashes(SYSTEM)
    home = policy.choose(["r0", "r1"], {}, hashes)
    other = "r1" if home == "r0" else "r0"
    # Within the bound, affinity wins over a shorter queue.
    assert policy.choose(["r0", "r1"], {home: 2, other: 1}, hashes) == home
    # At ceil(1.25 x the mean) or more: the next replica on the ring takes it, and now holds it.
    assert policy.choose(["r0", "r1"], {home: 10, other: 0}, hashes) == other
    assert policy.choose(["r0", "r1"], {home: 0, other: 0}, hashes) == other
    assert policy.bound(["r0", "r1"], {"r0": 2, "r1": 0}) == 2  # ceil(1.25 * 3 / 2)
    # No full block to go by: least outstanding.
    assert policy.choose(["r0", "r1"], {"r0": 3, "r1": 1}, []) == "r1"


@settings(max_examples=100)
@given(st.dictionaries(st.sampled_from("abcd"), st.integers(0, 50), min_size=1), st.binary(max_size=3))
def test_never_above_the_bound_unless_everyone_is(loads, key):
    policy = PrefixAwarePolicy()
    replicas = sorted(loads)
    chosen = policy.choose(replicas, loads, [key] if key else [])
    assert chosen in replicas
    bound = policy.bound(replicas, loads)
    if any(loads[r] < bound for r in replicas):
        assert loads[chosen] < bound


def test_a_dead_replica_is_forgotten_and_never_chosen():
    policy = PrefixAwarePolicy()
    hashes = prefix_hashes(SYSTEM)
    home = policy.choose(["r0", "r1"], {}, hashes)
    policy.forget(home)
    survivor = "r1" if home == "r0" else "r0"
    assert policy.choose([survivor], {}, hashes) == survivor


def test_round_robin_and_least_outstanding():
    rr = RoundRobinPolicy()
    assert [rr.choose(["b", "a"], {}, []) for _ in range(4)] == ["a", "b", "a", "b"]
    assert least_outstanding(["a", "b"], {"a": 2, "b": 1}) == "b"
    assert make_policy("least_outstanding").choose(["a", "b"], {"a": 0, "b": 1}, [b"x"]) == "a"
    assert {least_outstanding(["a", "b"], {}) for _ in range(64)} == {"a", "b"}  # ties shared
    with pytest.raises(ValueError, match="routing"):
        make_policy("random")
    with pytest.raises(ValueError, match="replica_ids"):
        PrefixAwarePolicy().choose([], {}, [])

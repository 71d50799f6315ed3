"""Which replica serves a request: prefix-aware with bounded load, else least outstanding requests.

Pure Python (no Ray), so the policy is tested on its own; ``serve_router`` plugs it into Ray
Serve's request-router hook.

A replica's prefix cache (``core/block_manager.py``) names full KV blocks by a chained hash, so two
prompts share cached blocks exactly as far as their leading blocks are equal. The router cannot see
the replicas' caches, but it sees every prompt it routes, so it keeps the same kind of chained hash
over the prompt's leading *text* blocks (``block_chars`` characters, about ``block_size`` tokens)
and remembers which replica it last sent each one to. A request then goes to:

1. the replica that received the longest prefix of its blocks (its cache most likely holds them);
2. else the replica its first block maps to on a consistent-hash ring (so conversations that share
   a system prompt meet on one replica, and a replica joining or leaving moves few of them);
3. in both cases only if that replica is not overloaded: its outstanding requests stay below
   ``ceil(load_factor x the mean)``, as in consistent hashing with bounded loads;
4. else (no full block, or every candidate overloaded) the replica with the fewest outstanding.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence

BLOCK_CHARS = 64  # about 16 tokens of English text: the KV cache's default block size
MAX_BLOCKS = 64  # blocks of a prompt the router hashes (4,096 characters)


def routing_text(body: Mapping) -> str:
    """The prompt text a request body starts with, in a canonical form: chat messages as
    ``role\\ncontent`` records (what the chat template lays out in the same order), a completion's
    prompt as is (token ids as their decimal list)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, Mapping):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
            parts.append(f"{m.get('role', '')}\n{content or ''}\x1e")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return json.dumps(prompt)
    return ""


def prefix_hashes(text: str, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS) -> list[bytes]:
    """Chained hashes of the full ``block_chars``-character blocks at the start of ``text`` (at most
    ``max_blocks``): block i's hash covers blocks 0..i, so equal hashes mean equal prefixes."""
    if block_chars < 1:
        raise ValueError(f"block_chars: must be >= 1, got {block_chars}")
    data = text.encode("utf-8")
    hashes: list[bytes] = []
    parent = b""
    for i in range(min(len(data) // block_chars, max_blocks)):
        parent = hashlib.blake2b(
            parent + data[i * block_chars : (i + 1) * block_chars], digest_size=16
        ).digest()
        hashes.append(parent)
    return hashes


class HashRing:
    """Consistent hashing: each replica owns ``vnodes`` points on a ring of 64-bit hashes; a key
    belongs to the first point at or after its own hash. Adding or removing a replica moves only
    the keys of its points."""

    def __init__(self, replica_ids: Sequence[str] = (), vnodes: int = 64) -> None:
        self.vnodes = vnodes
        self._points: list[tuple[int, str]] = []
        self._members: set[str] = set()
        self.set_members(replica_ids)

    @staticmethod
    def _hash(data: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")

    def set_members(self, replica_ids: Sequence[str]) -> None:
        members = set(replica_ids)
        if members == self._members:
            return
        self._members = members
        self._points = sorted(
            (self._hash(f"{r}#{v}".encode()), r) for r in members for v in range(self.vnodes)
        )

    def preference(self, key: bytes) -> list[str]:
        """Every replica, in ring order from ``key``'s point: its owner first, then the successors
        a bounded-load search falls through to."""
        if not self._points:
            return []
        start = bisect.bisect_left(self._points, (self._hash(key), ""))
        order: list[str] = []
        for i in range(len(self._points)):
            replica = self._points[(start + i) % len(self._points)][1]
            if replica not in order:
                order.append(replica)
                if len(order) == len(self._members):
                    break
        return order


def least_outstanding(replica_ids: Sequence[str], loads: Mapping[str, int]) -> str:
    """The replica with the fewest outstanding requests (ties broken at random, so idle replicas
    share the work instead of the first one taking all of it)."""
    if not replica_ids:
        raise ValueError("replica_ids: no replica to choose from")
    fewest = min(loads.get(r, 0) for r in replica_ids)
    return random.choice([r for r in replica_ids if loads.get(r, 0) == fewest])


class PrefixAwarePolicy:
    """Routes by prompt prefix (see the module's docstring). Keeps at most ``max_entries`` block
    hashes, least recently routed forgotten first, as a replica's LRU cache forgets blocks."""

    def __init__(self, load_factor: float = 1.25, max_entries: int = 200_000, vnodes: int = 64) -> None:
        if load_factor < 1.0:
            raise ValueError(f"load_factor: must be >= 1.0, got {load_factor}")
        self.load_factor = load_factor
        self.max_entries = max_entries
        self.ring = HashRing(vnodes=vnodes)
        self._owner: OrderedDict[bytes, str] = OrderedDict()  # block hash -> replica last sent it

    def bound(self, replica_ids: Sequence[str], loads: Mapping[str, int]) -> int:
        """A replica takes a request by affinity only while its outstanding requests are below
        this: ``ceil(load_factor x mean)``, counting the request being placed (Mirrokni et al.,
        consistent hashing with bounded loads). Tight even at low load, where one replica
        holding most conversations would otherwise slow every step it runs."""
        total = sum(loads.get(r, 0) for r in replica_ids) + 1
        return math.ceil(self.load_factor * total / len(replica_ids))

    def choose(self, replica_ids: Sequence[str], loads: Mapping[str, int], hashes: Sequence[bytes]) -> str:
        """The replica for a request whose prompt starts with blocks ``hashes``; records the choice."""
        if not replica_ids:
            raise ValueError("replica_ids: no replica to choose from")
        live = set(replica_ids)
        self.ring.set_members(replica_ids)
        bound = self.bound(replica_ids, loads)
        chosen = None
        # 1. the replica that got the longest prefix of these blocks.
        for h in reversed(hashes):
            owner = self._owner.get(h)
            if owner in live and loads.get(owner, 0) < bound:
                chosen = owner
                break
        # 2. the first block's place on the ring, skipping overloaded replicas.
        if chosen is None and hashes:
            chosen = next((r for r in self.ring.preference(hashes[0]) if loads.get(r, 0) < bound), None)
        # 3. no block to go by, or everyone is over the bound.
        if chosen is None:
            chosen = least_outstanding(replica_ids, loads)
        self.record(hashes, chosen)
        return chosen

    def record(self, hashes: Sequence[bytes], replica_id: str) -> None:
        for h in hashes:
            self._owner[h] = replica_id
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        """A replica died: its cache died with it."""
        for h in [h for h, r in self._owner.items() if r == replica_id]:
            del self._owner[h]


class RoundRobinPolicy:
    """The baseline: replicas in turn, whatever the prompt."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replica_ids: Sequence[str], loads: Mapping[str, int], hashes: Sequence[bytes]) -> str:
        if not replica_ids:
            raise ValueError("replica_ids: no replica to choose from")
        return sorted(replica_ids)[next(self._counter) % len(replica_ids)]


class LeastOutstandingPolicy:
    """Ignores the prompt: the replica with the fewest outstanding requests."""

    def choose(self, replica_ids: Sequence[str], loads: Mapping[str, int], hashes: Sequence[bytes]) -> str:
        return least_outstanding(replica_ids, loads)


POLICIES = {
    "prefix": PrefixAwarePolicy,
    "round_robin": RoundRobinPolicy,
    "least_outstanding": LeastOutstandingPolicy,
}


def make_policy(name: str, **kwargs):
    """A routing policy by name: ``prefix`` (default), ``round_robin``, ``least_outstanding``."""
    if name not in POLICIES:
        raise ValueError(f"routing: {name!r} is not one of {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)

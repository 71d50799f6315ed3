"""Paged KV blocks: a fixed pool, reference counts, and a prefix cache of full blocks.

A block holds ``block_size`` tokens of KV. Block 0 is reserved as the pad block: padding tokens
write their KV there and block tables are padded with it, so it is never handed out.

Prefix caching: a full block is named by a chained hash (the previous block's hash, its token ids
and, for the first block, an optional tenant salt), so equal hashes mean equal prefixes. A block
whose last owner finished keeps its hash and stays reusable until the pool runs short and it is
evicted, least recently freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence

from neuronserve.core.request import Request

PAD_BLOCK_ID = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached_blocks: dict[bytes, int] = {}  # hash -> block id (one block per hash)
        # Blocks with no owner, least recently freed first; allocation takes from the front and
        # evicts whatever hash the block still carries (lazy LRU eviction).
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.block_tables: dict[str, list[int]] = {}  # request id -> its blocks, in order
        self.prefix_queries = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found (both counted by the scheduler on admission)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks owned by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_blocks) / self.num_usable_blocks

    # ---------------------------------------------------------------- prefix cache
    def block_hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """Extend and return ``request.block_hashes`` to cover its first ``num_full_blocks`` blocks."""
        hashes = request.block_hashes
        bs = self.block_size
        parent = hashes[-1] if hashes else (request.cache_salt or "").encode()
        for i in range(len(hashes), num_full_blocks):
            tokens = array("q", request.token_ids_slice(i * bs, (i + 1) * bs))
            parent = hashlib.blake2b(parent + tokens.tobytes(), digest_size=16).digest()
            hashes.append(parent)
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """The blocks of the longest cached prefix of a request about to be admitted.

        At least one token is always left to compute, since its logits are needed.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in self.block_hashes(request, max_blocks):
            block_id = self.cached_blocks.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's blocks that are now full of computed KV to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        blocks = request.block_ids
        first = num_full
        while first > 0 and self.block_hash[blocks[first - 1]] is None:
            first -= 1
        hashes = self.block_hashes(request, num_full)
        for i in range(first, num_full):
            h, block_id = hashes[i], blocks[i]
            self.block_hash[block_id] = h
            # An equal block computed concurrently by another request stays the cached one.
            self.cached_blocks.setdefault(h, block_id)

    # ---------------------------------------------------------------- allocation
    def allocate(self, request: Request, num_new_tokens: int, hit_blocks: Sequence[int] = ()) -> bool:
        """Give ``request`` blocks for ``num_new_tokens`` more tokens after its computed ones (and
        after ``hit_blocks``, a cached prefix it takes over). All or nothing: on ``False`` nothing
        changed."""
        bs, blocks, ref_counts, free_blocks = (
            self.block_size,
            request.block_ids,
            self.ref_counts,
            self.free_blocks,
        )
        total_tokens = request.num_computed_tokens + len(hit_blocks) * bs + num_new_tokens
        num_new = -(-total_tokens // bs) - len(blocks) - len(hit_blocks)
        num_free_hits = sum(1 for b in hit_blocks if ref_counts[b] == 0) if hit_blocks else 0
        if num_new > len(free_blocks) - num_free_hits:
            return False
        for block_id in hit_blocks:
            if ref_counts[block_id] == 0:
                del free_blocks[block_id]
            ref_counts[block_id] += 1
            blocks.append(block_id)
        for _ in range(num_new):
            block_id, _ = free_blocks.popitem(last=False)
            if self.block_hash[block_id] is not None:
                self._evict(block_id)
            ref_counts[block_id] = 1
            blocks.append(block_id)
        self.block_tables[request.request_id] = blocks
        return True

    def append_blocks(self, requests: Sequence[Request]) -> list[Request]:
        """One more block at the end of each request's table: for running requests whose next
        token starts a new block (the decode rows entering one), ``allocate`` without its
        arithmetic, in one loop. Returns the requests left without a block: the pool ran dry."""
        free_blocks, ref_counts, block_hash = self.free_blocks, self.ref_counts, self.block_hash
        for i, request in enumerate(requests):
            if not free_blocks:
                return list(requests[i:])
            block_id, _ = free_blocks.popitem(last=False)
            if block_hash[block_id] is not None:
                self._evict(block_id)
            ref_counts[block_id] = 1
            request.block_ids.append(block_id)  # the same list as block_tables[request.request_id]
        return []

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first, so shared heads are evicted last."""
        blocks = self.block_tables.pop(request.request_id, None)
        if blocks is None:
            return
        for block_id in reversed(blocks):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_blocks[block_id] = None
        request.block_ids = []

    def trim(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past its first ``num_tokens`` tokens: blocks that held only
        rejected draft tokens. Such blocks were never full of computed KV, so never hashed."""
        blocks, keep = request.block_ids, -(-num_tokens // self.block_size)
        while len(blocks) > keep:
            block_id = blocks.pop()
            assert self.ref_counts[block_id] == 1 and self.block_hash[block_id] is None
            self.ref_counts[block_id] = 0
            self.free_blocks[block_id] = None

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if self.cached_blocks.get(h) == block_id:
            del self.cached_blocks[h]
        self.block_hash[block_id] = None

    # ---------------------------------------------------------------- invariants
    def check_integrity(self) -> None:
        """Raise ``AssertionError`` unless every block is free xor owned and reference counts equal
        the number of block tables that hold each block."""
        owners = Counter(b for table in self.block_tables.values() for b in table)
        problems: list[str] = []
        if self.ref_counts[PAD_BLOCK_ID] or PAD_BLOCK_ID in owners or PAD_BLOCK_ID in self.free_blocks:
            problems.append("the pad block was handed out")
        for rid, table in self.block_tables.items():
            if len(set(table)) != len(table):
                problems.append(f"request {rid} holds a block twice: {table}")
        for block_id in range(1, self.num_blocks):
            ref, is_free = self.ref_counts[block_id], block_id in self.free_blocks
            if ref != owners[block_id]:
                problems.append(f"block {block_id}: ref_count {ref} but {owners[block_id]} owners")
            if is_free == (ref > 0):
                problems.append(f"block {block_id}: ref_count {ref} but free={is_free}")
        for h, block_id in self.cached_blocks.items():
            if self.block_hash[block_id] != h:
                problems.append(f"cached block {block_id} does not carry its hash")
        if problems:
            raise AssertionError("BlockManager integrity: " + "; ".join(problems[:10]))

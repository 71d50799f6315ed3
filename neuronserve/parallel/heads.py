"""How attention heads are split across tensor-parallel ranks, grouped-query attention included.

Every rank must hold the same number of query heads and KV heads (static shapes), and each query
head must sit on the same rank as the KV head it reads. Three cases, one rule:

- The KV heads divide by TP (Llama-3-8B: 8 KV heads at TP 2, 4, 8): each rank takes
  ``kv_heads / tp`` KV heads and their query groups. No padding.
- TP exceeds the KV heads (Llama-3-8B at TP 24, SmolLM2's 3 KV heads at TP 4): KV heads are
  *replicated*, so each rank holds one; a KV head's query group is split among its replicas, and a
  replica with fewer query heads than the others is padded with zero heads.
- Neither divides (SmolLM2's 9 query / 3 KV heads at TP 2): each rank holds ``ceil(kv / tp)`` KV
  slots; the spare slots replicate KV heads, and query groups are padded as above.

A padded query head has zero rows in ``q_proj`` and zero columns in ``o_proj``, so it adds nothing
to the output. Its cost is compute and memory: the padded heads' share of ``qkv_proj`` / ``o_proj``
weights and attention FLOPs (``padded_query_heads / num_heads - 1``), and a replicated KV head
costs KV-cache memory on every rank that holds it (``kv_slots / num_kv_heads - 1`` more KV cache
in total than the unsharded model). ``HeadLayout.describe()`` prints both.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HeadLayout:
    """The head assignment of one model at one TP degree (the same on every rank).

    Attributes:
        kv_per_rank: KV heads each rank holds (replicas count).
        q_per_kv: query heads per local KV head (padding included).
        slots: for each KV slot, in rank order, ``(source_kv_head, source_query_heads)`` where a
            query entry of ``None`` is a zero (padding) head.
    """

    num_heads: int
    num_kv_heads: int
    tp_size: int
    kv_per_rank: int = field(init=False)
    q_per_kv: int = field(init=False)
    slots: tuple[tuple[int, tuple[int | None, ...]], ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {self.tp_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_heads} query heads are not a multiple of {self.num_kv_heads}"
            )
        group = self.num_heads // self.num_kv_heads
        kv_per_rank = _ceil_div(self.num_kv_heads, self.tp_size)
        num_slots = kv_per_rank * self.tp_size
        # KV head j gets replicas[j] slots: as even as possible, the first heads one more.
        base, extra = divmod(num_slots, self.num_kv_heads)
        q_per_kv = _ceil_div(group, base)
        slots = []
        for kv in range(self.num_kv_heads):
            replicas = base + (kv < extra)
            queries = list(range(kv * group, (kv + 1) * group))
            share, rest = divmod(group, replicas)
            start = 0
            for r in range(replicas):
                n = share + (r < rest)
                heads = tuple(queries[start : start + n]) + (None,) * (q_per_kv - n)
                slots.append((kv, heads))
                start += n
        object.__setattr__(self, "kv_per_rank", kv_per_rank)
        object.__setattr__(self, "q_per_kv", q_per_kv)
        object.__setattr__(self, "slots", tuple(slots))

    @property
    def q_per_rank(self) -> int:
        return self.kv_per_rank * self.q_per_kv

    @property
    def padded_num_heads(self) -> int:
        return self.q_per_rank * self.tp_size

    @property
    def num_kv_slots(self) -> int:
        return self.kv_per_rank * self.tp_size

    def rank_slots(self, rank: int) -> tuple[tuple[int, tuple[int | None, ...]], ...]:
        if not 0 <= rank < self.tp_size:
            raise ValueError(f"rank: must be in [0, {self.tp_size}), got {rank}")
        return self.slots[rank * self.kv_per_rank : (rank + 1) * self.kv_per_rank]

    def kv_heads(self, rank: int) -> list[int]:
        """The source KV head of each of ``rank``'s local KV heads."""
        return [kv for kv, _ in self.rank_slots(rank)]

    def q_heads(self, rank: int) -> list[int | None]:
        """The source query head of each of ``rank``'s local query heads (``None``: padding).
        Local query head ``i`` reads local KV head ``i // q_per_kv``."""
        return [q for _, heads in self.rank_slots(rank) for q in heads]

    def describe(self) -> str:
        pad_q = self.padded_num_heads - self.num_heads
        extra_kv = self.num_kv_slots - self.num_kv_heads
        return (
            f"TP {self.tp_size}: {self.q_per_rank} query heads and {self.kv_per_rank} KV heads per rank; "
            f"{pad_q} zero query heads ({pad_q / self.num_heads:.0%} more attention compute and q/o "
            f"weights), {extra_kv} replicated KV heads ({extra_kv / self.num_kv_heads:.0%} more KV cache "
            "in total)"
        )

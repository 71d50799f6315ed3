"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the sequence's
last ``n`` tokens (prompt and output alike), trying the longest ``n`` first.

Answers that quote their context (retrieved product text, code being edited, a document being
summarized) repeat long runs of it, and each such run is verified in a single step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` draft tokens to follow ``token_ids`` (none without a match)."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        # Candidate starts: an earlier position holding the last token (cheap first filter).
        ends = np.flatnonzero(tokens[: length - 1] == tokens[-1]) if length > 1 else []
        if len(ends) == 0:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            starts = ends[ends >= n - 1] - (n - 1)  # windows [start, start + n) ending at a candidate
            if len(starts) == 0:
                continue
            windows = sliding_window_view(tokens, n)[starts]  # (candidates, n)
            matches = starts[(windows == tokens[length - n :]).all(axis=1)]
            if len(matches):
                follow = int(matches[-1]) + n
                return tokens[follow : follow + k].tolist()
        return []

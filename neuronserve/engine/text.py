"""What part of a request's text may be streamed yet: stop strings and markup held back.

The detokenizer yields text as tokens arrive. ``TextStream`` decides how much of it can be released:
- a stop string ends the text where it begins, and any tail that could still grow into one is held,
  so no part of a stop string is ever streamed;
- with ``hold_markup`` a tag that has begun (``<product id="B0C1`` …) is held until its ``>``
  arrives, so no delta ends inside a tag; a "tag" longer than ``max_markup_chars`` is released as
  the plain text it probably is.
Text is only delayed, never changed: the released deltas concatenate to the final text.
"""

from __future__ import annotations

from collections.abc import Sequence


def _could_open_tag(after_lt: str) -> bool:
    """Whether ``<`` followed by ``after_lt`` may still be the start of a tag (``a < b`` is not)."""
    return not after_lt or after_lt[0].isalpha() or after_lt[0] in "/!?"


class TextStream:
    def __init__(self, stop: Sequence[str] = (), hold_markup: bool = False, max_markup_chars: int = 256):
        self.stop = tuple(stop)
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.hold_markup = hold_markup
        self.max_markup_chars = max_markup_chars
        self.text = ""  # everything detokenized so far, cut at a stop string once one is found
        self.released = 0  # text[:released] has been streamed
        self.stopped_by: str | None = None  # the stop string found, if any

    def push(self, delta: str, final: bool = False) -> str:
        """Add newly detokenized text; return the text that may be streamed now. ``final``: the
        request ends here, so release everything (short of a stop string)."""
        if self.stopped_by is not None:
            return ""  # the text ended at the stop string
        start = len(self.text)
        self.text += delta
        if self.stop and self.stopped_by is None:
            self._find_stop(max(0, start - self.max_stop_len + 1))
        final = final or self.stopped_by is not None
        end = len(self.text)
        if not final:
            end -= self._stop_prefix_len()
            if self.hold_markup:
                end = self._before_open_tag(end)
        end = max(end, self.released)
        out = self.text[self.released : end]
        self.released = end
        return out

    @property
    def pending(self) -> str:
        """Text detokenized but not yet released."""
        return self.text[self.released :]

    def _find_stop(self, search_from: int) -> None:
        # The stop string that completes first wins (then the one starting first), so the result
        # does not depend on how the text was split into deltas.
        found = [(i + len(s), i, s) for s in self.stop if (i := self.text.find(s, search_from)) != -1]
        if found:
            _, index, self.stopped_by = min(found)
            self.text = self.text[:index]

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is the beginning of some stop string."""
        text = self.text
        for n in range(min(len(text), self.max_stop_len - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _before_open_tag(self, end: int) -> int:
        """Where the first tag still open before ``end`` begins (``end`` if none): after the last
        ``>``, the first ``<`` that may start a tag, unless it is already over-long."""
        text = self.text
        lt = text.find("<", max(self.released, text.rfind(">", self.released, end) + 1), end)
        while lt != -1:
            if end - lt <= self.max_markup_chars and _could_open_tag(text[lt + 1 : end]):
                return lt
            lt = text.find("<", lt + 1, end)
        return end

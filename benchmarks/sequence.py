"""The order check of one subscriber connection: `seq` must arrive as 0, 1, 2, ...

Counting frames cannot tell a duplicate from a loss that cancels it out, nor see a
reorder, so every frame's `seq` is checked. The subscriber's hot path handles the expected
case inline (`seq == check.next`); everything else comes here, where it is classified:

- above `next`: the numbers skipped become holes (a gap, unless they turn up later);
- a hole: it turned up late, a reorder (no longer a gap);
- below `next` and not a hole: a duplicate;
- negative, at or above `limit` (the messages its channel gets), or not a number: unknown.

Holes still open at the end are the gaps. Messages missing at the tail (never followed by
a later one) are not gaps: they are counted as lost.
"""

from __future__ import annotations

SAMPLES = 5


class SequenceCheck:
    __slots__ = ("duplicates", "holes", "limit", "next", "reorders", "samples", "unknown")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.next = 0
        self.holes: set[int] = set()
        self.duplicates = 0
        self.reorders = 0
        self.unknown = 0
        self.samples: list[str] = []

    @property
    def gaps(self) -> int:
        return len(self.holes)

    @property
    def clean(self) -> bool:
        return not (self.holes or self.duplicates or self.reorders or self.unknown)

    def unexpected(self, seq: int) -> None:
        """Any `seq` but `next` (the hot path takes that one itself)."""
        expected = self.next
        if seq < 0 or seq >= self.limit:
            self.unknown += 1
            kind = "unknown"
        elif seq > expected:
            self.holes.update(range(expected, seq))
            self.next = seq + 1
            kind = "gap"
        elif seq in self.holes:
            self.holes.remove(seq)
            self.reorders += 1
            kind = "late"
        else:
            self.duplicates += 1
            kind = "duplicate"
        if len(self.samples) < SAMPLES:
            self.samples.append(f"{kind}: expected {expected}, got {seq}")

    def malformed(self) -> None:
        """A message frame whose `seq` is not a number."""
        self.unknown += 1
        if len(self.samples) < SAMPLES:
            self.samples.append("unknown: seq is not a number")

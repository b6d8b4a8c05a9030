"""The per-connection checks of what arrives: counting frames cannot tell a duplicate from a
loss that cancels it out, nor see a reorder, so every message frame is checked.

Three checks, each one object per connection:

- `OnceCheck` (always): each `seq` of the connection's channel arrives at most once. `seq`
  is the publisher's number of the message in its channel (0 … limit - 1); with the frame
  count this is "every message exactly once", whatever the order. A `seq` seen before is a
  **duplicate**; one the channel never gets (negative, at or above `limit`, not a number) is
  **unknown**. This is all that can be checked on Socket.IO, which has no offsets, and whose
  order across concurrent publishers is not defined.
- `OffsetCheck` (the hub, whose namespace keeps history, so every frame carries the
  channel's `offset` and `epoch`): starting from the position the subscribe reply gave,
  offsets go up by exactly 1 within that one epoch. This is the order the hub defines (the
  order its broker gave the publications), so it holds with any number of concurrent
  publishers. An offset above the next leaves holes, a hole filled later is a **reorder**,
  a hole still open at the end a **gap**, an offset at or below the last one and not a hole
  a **duplicate**, a frame of another epoch an **epoch** change, a frame without an offset
  (or a subscribe reply without a position) **missing**.
- `SequenceCheck` (`--ordered`, where one message per channel is in flight at a time, so the
  publisher's order is defined): `seq` goes 0, 1, 2, … with the same kinds as offsets.

The subscriber's hot path handles the expected case of each inline and hands anything else
to these objects. Messages missing at the tail (never followed by a later one) are not
gaps: they are counted as lost.
"""

from __future__ import annotations

SAMPLES = 5
# What each check counts (all of them fail a run), by the name reports give it.
CHECK_KINDS = {
    "seq": ("duplicates", "unknown"),
    "offsets": ("duplicates", "gaps", "reorders", "epochs", "missing"),
    "order": ("duplicates", "gaps", "reorders", "unknown"),
}
# Holes are kept one by one; a jump further than this (a broken number, not a lost
# stretch of a benchmark's messages) is counted as one gap of that many without a set.
MAX_HOLES = 1 << 20


class _Samples:
    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: list[str] = []

    def note(self, text: str) -> None:
        if len(self.samples) < SAMPLES:
            self.samples.append(text)


class OnceCheck(_Samples):
    """Each `seq` at most once (`seen[seq]`, set by the hot path)."""

    __slots__ = ("duplicates", "limit", "seen", "unknown")

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.seen = bytearray(limit)
        self.duplicates = 0
        self.unknown = 0

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.unknown)

    @property
    def received(self) -> int:
        return self.limit - self.seen.count(0)

    def unexpected(self, seq: int | None) -> None:
        """Anything but a `seq` in range that was not seen yet."""
        if seq is None or seq < 0 or seq >= self.limit:
            self.unknown += 1
            self.note(f"unknown seq: {seq if seq is not None else 'not a number'}")
        else:
            self.duplicates += 1
            self.note(f"duplicate seq {seq}")


class _Positions(_Samples):
    """What offsets and ordered `seq`s share: a next expected number and the holes."""

    __slots__ = ("duplicates", "far", "holes", "next", "reorders")

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self.next = start
        self.holes: set[int] = set()
        self.far = 0  # positions skipped by jumps past MAX_HOLES
        self.duplicates = 0
        self.reorders = 0

    @property
    def gaps(self) -> int:
        return len(self.holes) + self.far

    def _position(self, value: int, what: str) -> None:
        expected = self.next
        if value > expected:
            if value - expected > MAX_HOLES:
                self.far += value - expected
            else:
                self.holes.update(range(expected, value))
            self.next = value + 1
            kind = "gap"
        elif value in self.holes:
            self.holes.remove(value)
            self.reorders += 1
            kind = "late"
        else:
            self.duplicates += 1
            kind = "duplicate"
        self.note(f"{kind}: expected {what} {expected}, got {value}")


class OffsetCheck(_Positions):
    """Offsets go `base + 1`, `base + 2`, … in the epoch of the subscribe reply.

    `tail` is how a `/ws` frame of that epoch ends (`,"epoch":"E"}`): the hot path checks
    the epoch with one `endswith` and reads the offset just before it. A Centrifugo push has
    no epoch (it is in the subscribe reply only), so there `tail` stays empty and only the
    offset is checked."""

    __slots__ = ("epoch", "epochs", "missing", "positioned", "tail")

    def __init__(self) -> None:
        super().__init__()
        self.epoch = ""
        self.tail = b""
        self.positioned = False
        self.epochs = 0
        self.missing = 0

    def start(self, offset: int | None, epoch: str | None, frames_have_epoch: bool) -> None:
        """The position of the subscribe reply: the channel's last offset and its epoch."""
        if offset is None or not epoch:
            self.missing += 1
            self.note("the subscribe reply has no offset/epoch (no history?)")
            return
        self.positioned = True
        self.next = offset + 1
        self.epoch = epoch
        if frames_have_epoch:
            self.tail = b',"epoch":"' + epoch.encode() + b'"}'

    @property
    def clean(self) -> bool:
        return not (self.holes or self.far or self.duplicates or self.reorders or self.epochs
                    or self.missing)

    def unexpected(self, offset: int) -> None:
        """An offset of the right epoch but not `next`."""
        self._position(offset, "offset")

    def frame(self, offset: int | None, epoch: str | None) -> None:
        """The slow path: a frame the hot path could not read (or of another epoch)."""
        if offset is None or (self.tail and epoch is None):
            self.missing += 1
            self.note("a message without offset/epoch")
            return
        if not self.positioned:
            return  # already counted as missing once, at subscribe
        if epoch is not None and epoch != self.epoch:
            self.epochs += 1
            self.note(f"epoch {epoch} at offset {offset}, subscribed in {self.epoch}")
            return
        if offset == self.next:
            self.next = offset + 1
        else:
            self.unexpected(offset)


class SequenceCheck(_Positions):
    """`--ordered`: `seq` goes 0, 1, 2, … up to `limit` (the messages its channel gets)."""

    __slots__ = ("limit", "unknown")

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.unknown = 0

    @property
    def clean(self) -> bool:
        return not (self.holes or self.far or self.duplicates or self.reorders or self.unknown)

    def unexpected(self, seq: int) -> None:
        """Any `seq` but `next` (the hot path takes that one itself)."""
        if seq < 0 or seq >= self.limit:
            self.unknown += 1
            self.note(f"unknown: expected {self.next}, got {seq}")
            return
        self._position(seq, "seq")

    def malformed(self) -> None:
        """A message frame whose `seq` is not a number."""
        self.unknown += 1
        self.note("unknown: seq is not a number")

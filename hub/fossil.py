"""Fossil deltas (the format of Fossil SCM's delta.c, which Centrifugo's delta compression
and the SDKs' `applyDelta` use): `create(source, target)` writes the target as copies of
source ranges and literal inserts.

Written here: the PyPI packages that wrap delta.c build from source only (a C compiler in
every install, none in the slim image). Pure Python stays fast by doing the byte work in C:
what source and target share at both ends is found by slice comparison, a match is looked
for with `bytes.find` near where the source would go on (an index of the source's 16-byte
blocks only for a stretch that has none there), and each match is extended by comparing
slices, not bytes: a 12 KB JSON document with ten changed values takes about 0.4 ms, one
with one change under 0.1 ms (docs/protocol.md §11).

Every literal insert is whole UTF-8 characters when the target is UTF-8 (copies never
start or end inside a character), so a delta of JSON text is itself UTF-8 text, as the
JSON encoding needs (it carries a delta inside a JSON string).
"""

from __future__ import annotations

import sys
from array import array

_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_BLOCK = 16
_GALLOP = 64
_WINDOW = 256  # bytes either side of where the source would go on


def _int(value: int) -> bytes:
    """An unsigned integer in fossil's base 64."""
    if value == 0:
        return b"0"
    out = bytearray()
    while value:
        out.append(_DIGITS[value & 63])
        value >>= 6
    out.reverse()
    return bytes(out)


_WORD = "I" if array("I").itemsize == 4 else "L"


def checksum(data: bytes) -> int:
    """Sum of the big-endian 32-bit words of `data` (zero-padded), modulo 2**32."""
    pad = -len(data) % 4
    if pad:
        data += b"\0" * pad
    words = array(_WORD, data)
    if sys.byteorder == "little":
        words.byteswap()
    return sum(words) & 0xFFFFFFFF


def _common_length(a: bytes, a_at: int, b: bytes, b_at: int) -> int:
    """How many bytes a[a_at:] and b[b_at:] have in common at their start."""
    most = min(len(a) - a_at, len(b) - b_at)
    done = 0
    step = _GALLOP
    while done < most:
        size = min(step, most - done)
        if a[a_at + done:a_at + done + size] != b[b_at + done:b_at + done + size]:
            low, high = 0, size  # common for `low` bytes, a difference within `high`
            while high - low > 1:
                middle = (low + high) // 2
                if a[a_at + done:a_at + done + middle] == b[b_at + done:b_at + done + middle]:
                    low = middle
                else:
                    high = middle
            return done + low
        done += size
        step *= 2
    return done


def _common_suffix(a: bytes, b: bytes, most: int) -> int:
    """How many bytes (at most `most`) a and b have in common at their end."""
    done = 0
    step = _GALLOP
    a_end, b_end = len(a), len(b)
    while done < most:
        size = min(step, most - done)
        if a[a_end - done - size:a_end - done] != b[b_end - done - size:b_end - done]:
            low, high = 0, size
            while high - low > 1:
                middle = (low + high) // 2
                if a[a_end - done - middle:a_end - done] == b[b_end - done - middle:b_end - done]:
                    low = middle
                else:
                    high = middle
            return done + low
        done += size
        step *= 2
    return done


def _continues(data: bytes, at: int) -> bool:
    """Whether `at` is inside a UTF-8 character (a continuation byte)."""
    return at < len(data) and data[at] & 0xC0 == 0x80


def create(source: bytes, target: bytes) -> bytes:
    """The delta that turns `source` into `target`: what both start and end with is one
    copy each (found at C speed), and the block search runs on what lies between."""
    parts = [_int(len(target)), b"\n"]
    prefix = _common_length(source, 0, target, 0)
    while prefix and _continues(target, prefix):
        prefix -= 1
    room = min(len(source), len(target)) - prefix
    suffix = _common_suffix(source, target, room)
    while suffix and _continues(target, len(target) - suffix):
        suffix -= 1
    if prefix:
        parts += (_int(prefix), b"@0,")
    source_end = len(source) - suffix
    _between(source[prefix:source_end], target[prefix:len(target) - suffix], prefix, parts)
    if suffix:
        parts += (_int(suffix), b"@", _int(source_end), b",")
    parts += (_int(checksum(target)), b";")
    return b"".join(parts)


def _between(source: bytes, target: bytes, offset: int, parts: list[bytes]) -> None:
    """Copies (of `source`, which starts at `offset` of the whole) and literals that make
    `target`, appended to `parts`. After each copy the next match is looked for near where
    the source would go on (`find` in a window, at C speed: edits of a document move the
    rest little); only a stretch with no match there for a block's length consults the
    index of the source's aligned blocks, built then."""
    index: dict[bytes, int] | None = None
    literal_from = 0  # target bytes before this are written
    expected = 0  # where in the source the target at `literal_from` would go on
    at = 0
    misses = 0
    last = len(target) - _BLOCK
    while at <= last:
        block = target[at:at + _BLOCK]
        low = max(0, expected + at - literal_from - _WINDOW)
        found = source.find(block, low, low + 2 * _WINDOW + _BLOCK)
        if found < 0:
            misses += 1
            if misses > _BLOCK:
                if index is None:
                    index = {source[i:i + _BLOCK]: i
                             for i in range(0, len(source) - _BLOCK + 1, _BLOCK)}
                found = index.get(block, -1)
            if found < 0:
                at += 1
                continue
        misses = 0
        start, origin = at, found
        while start > literal_from and origin > 0 and source[origin - 1] == target[start - 1]:
            start -= 1
            origin -= 1
        end = at + _BLOCK + _common_length(source, found + _BLOCK, target, at + _BLOCK)
        while _continues(target, start) and start < end:
            start += 1
            origin += 1
        while _continues(target, end) and end > start:
            end -= 1
        if end - start < _BLOCK // 2:
            at += 1
            continue
        if start > literal_from:
            parts += (_int(start - literal_from), b":", target[literal_from:start])
        parts += (_int(end - start), b"@", _int(origin + offset), b",")
        expected = origin + end - start
        literal_from = at = end
    if literal_from < len(target):
        parts += (_int(len(target) - literal_from), b":", target[literal_from:])

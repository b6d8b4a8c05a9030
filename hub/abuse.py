"""Protocol errors of clients: counted by reason, logged at INFO at most once a minute.

Bad input is the client's fault, never the hub's, so it is no ERROR and no traceback: each
is one increment of `hub_protocol_errors_total{reason}` and, per reason, one INFO line per
interval that says how many there were. The reasons are a fixed set (`REASONS`), so a
client cannot make up label values.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable

import msgspec
from prometheus_client import Counter

from hub.errors import CloseCode, ErrorCode, HubError

log = logging.getLogger("hub.abuse")

LOG_INTERVAL = 60.0

REASONS: tuple[str, ...] = (
    # HTTP, before any WebSocket (hub.deadline and uvicorn's own refusals)
    "bad_http_request",  # uvicorn could not parse the request: 400
    "unsupported_upgrade",  # an Upgrade other than websocket
    "http_head_too_big",  # request line and headers still incomplete after 64 KiB: 431
    "handshake_timeout",  # a request not in, head and body, within HUB_HANDSHAKE_TIMEOUT
    # WebSocket framing (the close code the connection ended with)
    "bad_frame",  # 1002: reserved bits, unknown opcode, unmasked, bad close code...
    "bad_utf8",  # 1007: a text frame or close reason that is not UTF-8
    "frame_too_big",  # 1009: a message over HUB_MAX_FRAME_BYTES
    "binary_frame",  # 1003: the hub's protocols are text only
    # commands
    "bad_json",  # a frame (or a Centrifugo line) that is not a JSON object
    "unknown_command",  # a `type` or method the hub does not know
    "bad_command",  # a known command with missing or mistyped fields, or out of place
    # authentication
    "auth_failed",  # no token, an invalid one, or a first frame that is no auth/connect
    "auth_timeout",  # nothing in HUB_AUTH_TIMEOUT
)

# The close code a WebSocket ended with, when it says the client broke the framing. A client
# that closes with one of these itself says the same, and is counted the same.
CLOSE_REASONS: dict[int, str] = {
    1002: "bad_frame",
    int(CloseCode.BINARY_FRAME): "binary_frame",
    1007: "bad_utf8",
    int(CloseCode.FRAME_TOO_BIG): "frame_too_big",
}

_object_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])


def decode_reason(raw: str | bytes, error: HubError) -> str:
    """The reason for a frame that failed to decode as a command."""
    if error.code == ErrorCode.UNKNOWN_TYPE:
        return "unknown_command"
    try:
        _object_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return "bad_json"
    return "bad_command"


def auth_reason(reason: str) -> str | None:
    """The protocol error of a failed authentication (`AuthFailed.reason`); an expired token
    is none: clients with old tokens are ordinary."""
    if reason == "expired":
        return None
    return "auth_timeout" if reason == "timeout" else "auth_failed"


class RateLimitedLines:
    """At most one line per key per `interval`: the first occurrence is told at once, the
    ones after it within the interval at its end, as a count."""

    def __init__(
        self,
        emit: Callable[[str, int], None],
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self.interval = interval
        self._clock = clock
        self._quiet_until: dict[str, float] = {}
        self._pending: dict[str, int] = {}
        self._flushes: dict[str, asyncio.TimerHandle] = {}

    def hit(self, key: str) -> None:
        now = self._clock()
        if now >= self._quiet_until.get(key, 0.0):
            count = self._pending.pop(key, 0) + 1
            self._quiet_until[key] = now + self.interval
            self._emit(key, count)
            return
        self._pending[key] = self._pending.get(key, 0) + 1
        if key not in self._flushes:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop: the count goes out with the next line
                return
            delay = self._quiet_until[key] - now
            self._flushes[key] = loop.call_later(delay, self._flush, key)

    def _flush(self, key: str) -> None:
        self._flushes.pop(key, None)
        count = self._pending.pop(key, 0)
        if count:
            self._quiet_until[key] = self._clock() + self.interval
            self._emit(key, count)

    def close(self) -> None:
        """Say what is pending now (a node that stops)."""
        for key in list(self._flushes):
            self._flushes.pop(key).cancel()
            self._flush(key)


class ProtocolErrors:
    """`hub_protocol_errors_total{reason}` and its rate-limited INFO lines, for one node."""

    def __init__(self, counter: Counter, interval: float = LOG_INTERVAL) -> None:
        self._children = {reason: counter.labels(reason) for reason in REASONS}
        self.lines = RateLimitedLines(self._say, interval)

    def count(self, reason: str) -> None:
        self._children[reason].inc()
        self.lines.hit(reason)

    def count_close(self, code: int | None) -> None:
        """A connection ended with `code`: count it if that says the client broke the
        framing (`CLOSE_REASONS`)."""
        reason = CLOSE_REASONS.get(code) if code is not None else None
        if reason is not None:
            self.count(reason)

    def _say(self, reason: str, count: int) -> None:
        interval = int(self.lines.interval)
        log.info("client protocol errors: %s x%d (at most one line per %d s)",
                 reason, count, interval, extra={"reason": reason, "count": count})


CURRENT: contextvars.ContextVar[ProtocolErrors | None] = contextvars.ContextVar(
    "hub_protocol_errors", default=None
)
"""Whose connection uvicorn is handling while it runs one of the hub's HTTP protocol
callbacks (`hub.deadline`), so that the log filter of `hub.logs` can count uvicorn's own
refusals for the right node."""

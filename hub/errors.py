"""Error codes (frames and HTTP) and WebSocket close codes of the contract (PROTOCOL §3, §9)."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_CHANNEL = "invalid_channel"
    FORBIDDEN = "forbidden"
    ALREADY_SUBSCRIBED = "already_subscribed"
    NOT_SUBSCRIBED = "not_subscribed"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    BINARY_FRAME = 1003
    POLICY_VIOLATION = 1008
    FRAME_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    RESTARTING = 1012
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    TOKEN_EXPIRED = 4002
    DISCONNECTED_BY_API = 4003
    SLOW_CONSUMER = 4008
    TOO_MANY_COMMANDS = 4029


HTTP_STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.INVALID_CHANNEL: 400,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


MAX_CLOSE_REASON_BYTES = 123


def close_reason(text: str) -> str:
    """A close frame's reason fits in 123 bytes of UTF-8; a longer one makes the close
    itself fail (the client would see 1006, not the code)."""
    encoded = text.encode()
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return text
    return encoded[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


class HubError(Exception):
    """A failure that is answered to the caller with a contract error code, never a crash."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BrokerUnavailable(HubError):
    """The broker cannot be reached; the command was not carried out."""

    def __init__(self, message: str = "broker unavailable") -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)

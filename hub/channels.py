"""Channel names, personal channels and who may do what on a channel (PROTOCOL §4)."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

from hub.errors import ErrorCode, HubError
from hub.settings import Namespace, Settings

_NAME = re.compile(r"[A-Za-z0-9_\-:.=/]{1,255}")
PERSONAL_PREFIX = "@"


def is_personal(channel: str) -> bool:
    return channel.startswith(PERSONAL_PREFIX)


def personal_channel(user: str) -> str:
    return PERSONAL_PREFIX + user


def is_valid(channel: str) -> bool:
    if is_personal(channel):
        return 1 < len(channel) <= 129
    return _NAME.fullmatch(channel) is not None


def check_name(channel: str) -> None:
    if not is_valid(channel):
        raise HubError(
            ErrorCode.INVALID_CHANNEL,
            "channel names are 1-255 characters of A-Z a-z 0-9 _ - : . = /, or @user",
        )


def check_client_channel(channel: str) -> None:
    """A channel a client names in a command: valid, and not anybody's personal channel."""
    check_name(channel)
    if is_personal(channel):
        raise HubError(ErrorCode.FORBIDDEN, "personal channels are closed to clients")


def matches_any(channel: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(channel, pattern) for pattern in patterns)


class Permissions:
    """Decides subscribe and publish rights of one connection from its claims and the
    namespace options; dev mode opens every non-personal channel."""

    __slots__ = ("_dev", "_publish_patterns", "_settings", "_subscribe_patterns")

    def __init__(
        self,
        settings: Settings,
        subscribe_patterns: tuple[str, ...],
        publish_patterns: tuple[str, ...],
    ) -> None:
        self._settings = settings
        self._dev = settings.dev
        self._subscribe_patterns = subscribe_patterns
        self._publish_patterns = publish_patterns

    def namespace(self, channel: str) -> Namespace:
        return self._settings.namespace_of(channel)

    def check_subscribe(self, channel: str, granted: bool = False) -> Namespace:
        """`granted`: a subscription token names this channel (Centrifugo's protocol)."""
        check_client_channel(channel)
        namespace = self.namespace(channel)
        # proxy: the subscribe hook decides (PROTOCOL §13)
        if self._dev or namespace.subscribe in ("any", "proxy") or granted:
            return namespace
        if not matches_any(channel, self._subscribe_patterns):
            raise HubError(ErrorCode.FORBIDDEN, f"token does not allow subscribing to {channel}")
        return namespace

    def check_publish(self, channel: str) -> Namespace:
        check_client_channel(channel)
        namespace = self.namespace(channel)
        if self._dev or namespace.publish in ("any", "proxy"):  # proxy: the hook decides
            return namespace
        if namespace.publish == "token" and matches_any(channel, self._publish_patterns):
            return namespace
        raise HubError(ErrorCode.FORBIDDEN, f"publishing to {channel} is not allowed")

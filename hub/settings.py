"""Configuration: one frozen Struct, built once from flags, HUB_* variables and the TOML file.

Every option of PROTOCOL §10 is both a flag and a variable; the flag wins. Values are
validated here, once, so the rest of the code can trust them.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from hub.redis.url import RedisUrlError, parse_redis_url

SubscribePolicy = Literal["token", "any", "proxy"]
PublishPolicy = Literal["none", "token", "any", "proxy"]
LogFormat = Literal["text", "json"]

DEFAULT_NAMESPACE = "default"


class SettingsError(ValueError):
    """Configuration that cannot run; the message says which option and why."""


class Namespace(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Options of one channel namespace (PROTOCOL §4)."""

    subscribe: SubscribePolicy = "token"
    publish: PublishPolicy = "none"
    history_size: int = 0
    history_ttl: float = 0
    presence: bool = False
    join_leave: bool = False
    events_client_publish: bool = False  # PROTOCOL §14: client publications as events
    # Delta compression a subscription on /connection/websocket may ask for ("fossil").
    allowed_delta_types: tuple[Literal["fossil"], ...] = ()

    @property
    def has_history(self) -> bool:
        return self.history_size > 0 and self.history_ttl > 0


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None
    node_id: str = ""
    dev: bool = False
    config: str | None = None
    namespaces: dict[str, Namespace] = msgspec.field(default_factory=dict)
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_require_exp: bool = True
    api_key: str | None = None
    max_connections: int = 0
    max_frame_bytes: int = 65536
    queue_limit: int = 1000
    max_subscriptions: int = 512
    auth_timeout: float = 5.0
    handshake_timeout: float = 10.0
    ping_interval: float = 25.0
    drain_seconds: float = 10.0
    drain_delay: float = 1.0
    rate_limit: float = 100.0
    rate_limit_grace: float = 10.0
    recovery_max: int = 10000
    presence_ttl: float = 30.0
    redis_min_replicas: int = 0
    centrifugo: bool = True
    emulation: bool = True
    centrifugo_api_prefix: str = "/centrifugo/api"
    # /connection/websocket: a connect without a token, or with one without `sub`, is an
    # anonymous user (Centrifugo's allow_anonymous_connect_without_token).
    anonymous: bool = False
    log_level: str = "info"
    log_format: LogFormat = "text"
    access_log: bool = False
    # Hooks (PROTOCOL §13): kept here as the text the variables hold; `hub.hooks.HookConfig`
    # reads them (lists comma-separated, tables as JSON objects).
    hook_connect_url: str | None = None
    hook_refresh_url: str | None = None
    hook_subscribe_url: str | None = None
    hook_publish_url: str | None = None
    hook_sub_refresh_url: str | None = None
    hook_rpc_url: str | None = None
    hook_rpc_routes: str = ""
    hook_timeout: float = 1.0
    hook_headers: str = ""
    hook_static_headers: str = ""
    hook_concurrency: int = 64
    hook_connect_always: bool = False
    allowed_origins: str = ""
    events_url: str | None = None  # PROTOCOL §14; also `url` of the TOML's [events]
    events_secret: str | None = None
    events_max_pending: int = 100_000
    events_max_age: float = 86400.0  # s: older than this when it would be sent: dropped

    def namespace_of(self, channel: str) -> Namespace:
        """Options for a channel: its namespace's, else the default namespace's."""
        name, sep, _ = channel.partition(":")
        if sep:
            found = self.namespaces.get(name)
            if found is not None:
                return found
        return self.namespaces.get(DEFAULT_NAMESPACE, _BUILTIN_NAMESPACE)


_BUILTIN_NAMESPACE = Namespace()

# Option name → environment variable. Every Settings field but `namespaces` has one.
_ENV_NAMES: dict[str, str] = {
    name: "HUB_" + name.upper() for name in Settings.__struct_fields__ if name != "namespaces"
}
_ENV_NAMES["jwks_url"] = "HUB_JWKS_URL"


def variables() -> dict[str, str]:
    """Option name -> its HUB_* variable, for every option (all but the namespaces)."""
    return dict(_ENV_NAMES)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(f"{name}: expected 1/0/true/false, got {raw!r}")


def _coerce(name: str, raw: object, kind: Any) -> object:
    if not isinstance(raw, str):
        return raw
    if kind is bool:
        return _parse_bool(name, raw)
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    return raw


def _read_config(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"HUB_CONFIG: cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"HUB_CONFIG: {path} is not valid TOML: {exc}") from None


# `[hooks]` keys of the TOML file and the option each sets (when no flag or variable does).
_HOOK_KEYS = {
    "connect_url", "refresh_url", "subscribe_url", "publish_url", "sub_refresh_url",
    "rpc_url", "rpc_routes", "timeout", "headers", "static_headers", "concurrency",
    "connect_always",
}


def load_hooks(path: str) -> dict[str, object]:
    """The `[hooks]` table as options (`hook_*`): lists become comma-separated text and
    tables JSON text, as the variables spell them."""
    table = _read_config(path).get("hooks", {})
    if not isinstance(table, dict):
        raise SettingsError("HUB_CONFIG: [hooks] must be a table")
    unknown = set(table) - _HOOK_KEYS
    if unknown:
        raise SettingsError(f"HUB_CONFIG: unknown keys in [hooks]: {sorted(unknown)}")
    options: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, list):
            options["hook_" + key] = ",".join(str(item) for item in value)
        elif isinstance(value, dict):
            options["hook_" + key] = msgspec.json.encode(value).decode()
        else:
            options["hook_" + key] = value
    return options


def load_namespaces(path: str) -> dict[str, Namespace]:
    """Read `[namespaces.NAME]` tables; options a namespace leaves out come from `default`."""
    document = _read_config(path)
    unknown = set(document) - {"namespaces", "hooks", "events"}
    if unknown:
        raise SettingsError(f"HUB_CONFIG: unknown top-level keys {sorted(unknown)}")
    tables = document.get("namespaces", {})
    if not isinstance(tables, dict):
        raise SettingsError("HUB_CONFIG: [namespaces] must be a table of tables")
    defaults = tables.get(DEFAULT_NAMESPACE, {})
    namespaces: dict[str, Namespace] = {}
    for name, options in tables.items():
        if not isinstance(options, dict):
            raise SettingsError(f"HUB_CONFIG: [namespaces.{name}] must be a table")
        merged = {**defaults, **options}
        try:
            namespaces[name] = msgspec.convert(merged, Namespace)
        except msgspec.ValidationError as exc:
            raise SettingsError(f"HUB_CONFIG: [namespaces.{name}]: {exc}") from None
    return namespaces


_EVENTS_TABLE = {"url": "events_url", "secret": "events_secret",
                 "max_pending": "events_max_pending", "max_age": "events_max_age"}


def load_events_table(path: str) -> dict[str, object]:
    """The `[events]` table of the TOML file (`url`, `secret`, `max_pending`, `max_age`), as
    options."""
    try:
        table = tomllib.loads(Path(path).read_text()).get("events", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}  # load_namespaces has said what is wrong with the file
    if not isinstance(table, dict):
        raise SettingsError("HUB_CONFIG: [events] must be a table")
    unknown = set(table) - set(_EVENTS_TABLE)
    if unknown:
        raise SettingsError(f"HUB_CONFIG: [events]: unknown keys {sorted(unknown)}")
    return {_EVENTS_TABLE[key]: value for key, value in table.items() if value != ""}


def _read_public_key(value: str) -> str:
    """HUB_JWT_PUBLIC_KEY is PEM text or the path of a PEM file."""
    if "-----BEGIN" in value:
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise SettingsError(
            f"HUB_JWT_PUBLIC_KEY: not PEM text and not a readable file: {exc}"
        ) from None


def default_node_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def load_settings(
    overrides: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags (`overrides`, None meaning "not given") over HUB_* variables over defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, field_type in Settings.__annotations__.items():
        if name == "namespaces":
            continue
        raw: object = None
        if overrides is not None and overrides.get(name) is not None:
            raw = overrides[name]
        elif _ENV_NAMES[name] in env:
            raw = env[_ENV_NAMES[name]]
        if raw is None:
            continue
        kind = {"bool": bool, "int": int, "float": float}.get(str(field_type), str)
        values[name] = _coerce(_ENV_NAMES[name], raw, kind)
    if values.get("config"):
        for name, value in load_hooks(str(values["config"])).items():
            values.setdefault(name, value)
    for optional_text in (
        "redis_url", "jwt_secret", "jwt_public_key", "jwks_url", "jwt_audience", "jwt_issuer",
        "api_key", "config", "events_url", "events_secret", "hook_connect_url",
        "hook_refresh_url", "hook_subscribe_url", "hook_publish_url", "hook_sub_refresh_url",
        "hook_rpc_url",
    ):
        if values.get(optional_text) == "":
            values[optional_text] = None
    if values.get("config"):
        values["namespaces"] = load_namespaces(str(values["config"]))
        for name, value in load_events_table(str(values["config"])).items():
            values.setdefault(name, value)  # flags and variables win over the file
    if values.get("jwt_public_key"):
        values["jwt_public_key"] = _read_public_key(str(values["jwt_public_key"]))
    if not values.get("node_id"):
        values["node_id"] = default_node_id()
    for lowered in ("log_level", "log_format"):
        if lowered in values:
            values[lowered] = str(values[lowered]).lower()
    try:
        settings = msgspec.convert(values, Settings)
    except msgspec.ValidationError as exc:
        # msgspec names the field (`$.log_format`); the user knows the variable.
        found = re.search(r"`\$\.(\w+)", str(exc))
        option = _ENV_NAMES.get(found.group(1), "") if found else ""
        raise SettingsError(f"{option}: {exc}" if option else str(exc)) from None
    validate(settings)
    return settings


_API_PREFIX = re.compile(r"(?:/[A-Za-z0-9_.\-]+)+")


def validate(settings: Settings) -> None:
    checks: list[tuple[bool, str]] = [
        (0 <= settings.port < 65536, "HUB_PORT must be 0-65535 (0 = any free port)"),
        (settings.max_connections >= 0, "HUB_MAX_CONNECTIONS must be >= 0"),
        (settings.max_frame_bytes >= 256, "HUB_MAX_FRAME_BYTES must be >= 256"),
        (settings.queue_limit >= 1, "HUB_QUEUE_LIMIT must be >= 1"),
        (settings.max_subscriptions >= 0, "HUB_MAX_SUBSCRIPTIONS must be >= 0"),
        (settings.auth_timeout > 0, "HUB_AUTH_TIMEOUT must be > 0"),
        (settings.handshake_timeout > 0, "HUB_HANDSHAKE_TIMEOUT must be > 0"),
        (settings.ping_interval >= 0, "HUB_PING_INTERVAL must be >= 0"),
        (settings.drain_seconds >= 0, "HUB_DRAIN_SECONDS must be >= 0"),
        (settings.drain_delay >= 0, "HUB_DRAIN_DELAY must be >= 0"),
        (settings.rate_limit >= 0, "HUB_RATE_LIMIT must be >= 0 (0 = no limit)"),
        (settings.rate_limit_grace >= 0, "HUB_RATE_LIMIT_GRACE must be >= 0"),
        (settings.recovery_max >= 0, "HUB_RECOVERY_MAX must be >= 0"),
        (settings.presence_ttl >= 1, "HUB_PRESENCE_TTL must be >= 1"),
        (settings.redis_min_replicas >= 0, "HUB_REDIS_MIN_REPLICAS must be >= 0"),
        (
            _API_PREFIX.fullmatch(settings.centrifugo_api_prefix) is not None,
            "HUB_CENTRIFUGO_API_PREFIX must be a path: / and segments of A-Z a-z 0-9 _ - . "
            "(e.g. /centrifugo/api), without a trailing /",
        ),
        (
            settings.centrifugo_api_prefix != "/api",
            "HUB_CENTRIFUGO_API_PREFIX cannot be /api: the hub's own API calls live there",
        ),
        (
            settings.log_level in {"critical", "error", "warning", "info", "debug", "trace"},
            "HUB_LOG_LEVEL must be one of critical, error, warning, info, debug, trace",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SettingsError(message)
    if settings.redis_url:
        try:
            parse_redis_url(settings.redis_url)
        except RedisUrlError as exc:
            raise SettingsError(str(exc)) from None
    if settings.events_max_pending < 1:
        raise SettingsError("HUB_EVENTS_MAX_PENDING must be >= 1")
    if not 0 < settings.events_max_age < math.inf:
        raise SettingsError("HUB_EVENTS_MAX_AGE must be > 0 (seconds)")
    if settings.events_url:
        if not settings.events_url.startswith(("http://", "https://")):
            raise SettingsError("HUB_EVENTS_URL must be an http:// or https:// URL")
        if not settings.events_secret:
            raise SettingsError("HUB_EVENTS_URL needs HUB_EVENTS_SECRET (batches are signed)")
    for name, namespace in settings.namespaces.items():
        if namespace.history_size < 0 or namespace.history_ttl < 0:
            raise SettingsError(f"[namespaces.{name}]: history_size and history_ttl must be >= 0")
    from hub.hooks import HookConfig  # hooks read settings; settings only check them

    HookConfig.of(settings)

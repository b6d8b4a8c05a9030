"""hub.settings.load_settings: flags over HUB_* variables over defaults, value parsing,
TOML namespaces, and errors that name the option (PROTOCOL §4, §10)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hub.settings import Namespace, Settings, SettingsError, load_settings

PEM = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"

# (variable, raw value, field, parsed value): one non-default value for every variable.
EVERY_VARIABLE: list[tuple[str, str, str, object]] = [
    ("HUB_HOST", "0.0.0.0", "host", "0.0.0.0"),
    ("HUB_PORT", "9001", "port", 9001),
    ("HUB_REDIS_URL", "redis://redis:6379/2", "redis_url", "redis://redis:6379/2"),
    ("HUB_NODE_ID", "node-7", "node_id", "node-7"),
    ("HUB_DEV", "1", "dev", True),
    ("HUB_JWT_SECRET", "s3cret", "jwt_secret", "s3cret"),
    ("HUB_JWT_PUBLIC_KEY", PEM, "jwt_public_key", PEM),
    ("HUB_JWKS_URL", "https://idp.example/jwks.json", "jwks_url", "https://idp.example/jwks.json"),
    ("HUB_JWT_AUDIENCE", "hub-clients", "jwt_audience", "hub-clients"),
    ("HUB_JWT_ISSUER", "https://idp.example/", "jwt_issuer", "https://idp.example/"),
    ("HUB_JWT_REQUIRE_EXP", "0", "jwt_require_exp", False),
    ("HUB_API_KEY", "k3y", "api_key", "k3y"),
    ("HUB_MAX_CONNECTIONS", "7", "max_connections", 7),
    ("HUB_MAX_FRAME_BYTES", "1024", "max_frame_bytes", 1024),
    ("HUB_QUEUE_LIMIT", "5", "queue_limit", 5),
    ("HUB_MAX_SUBSCRIPTIONS", "3", "max_subscriptions", 3),
    ("HUB_AUTH_TIMEOUT", "2.5", "auth_timeout", 2.5),
    ("HUB_HANDSHAKE_TIMEOUT", "3", "handshake_timeout", 3.0),
    ("HUB_PING_INTERVAL", "0", "ping_interval", 0.0),
    ("HUB_DRAIN_SECONDS", "3", "drain_seconds", 3.0),
    ("HUB_DRAIN_DELAY", "0.25", "drain_delay", 0.25),
    ("HUB_RATE_LIMIT", "7", "rate_limit", 7.0),
    ("HUB_RATE_LIMIT_GRACE", "2", "rate_limit_grace", 2.0),
    ("HUB_RECOVERY_MAX", "9", "recovery_max", 9),
    ("HUB_PRESENCE_TTL", "12", "presence_ttl", 12.0),
    ("HUB_REDIS_MIN_REPLICAS", "1", "redis_min_replicas", 1),
    ("HUB_CENTRIFUGO", "0", "centrifugo", False),
    ("HUB_EMULATION", "0", "emulation", False),
    ("HUB_CENTRIFUGO_API_PREFIX", "/cf/api", "centrifugo_api_prefix", "/cf/api"),
    ("HUB_ANONYMOUS", "1", "anonymous", True),
    ("HUB_LOG_LEVEL", "debug", "log_level", "debug"),
    ("HUB_LOG_FORMAT", "json", "log_format", "json"),
    ("HUB_ACCESS_LOG", "1", "access_log", True),
    ("HUB_HOOK_CONNECT_URL", "http://app/connect", "hook_connect_url", "http://app/connect"),
    ("HUB_HOOK_REFRESH_URL", "http://app/refresh", "hook_refresh_url", "http://app/refresh"),
    ("HUB_HOOK_SUBSCRIBE_URL", "http://app/sub", "hook_subscribe_url", "http://app/sub"),
    ("HUB_HOOK_PUBLISH_URL", "http://app/pub", "hook_publish_url", "http://app/pub"),
    ("HUB_HOOK_SUB_REFRESH_URL", "http://app/sr", "hook_sub_refresh_url", "http://app/sr"),
    ("HUB_HOOK_RPC_URL", "http://app/rpc", "hook_rpc_url", "http://app/rpc"),
    ("HUB_HOOK_RPC_ROUTES", '{"a.": "http://a/rpc"}', "hook_rpc_routes", '{"a.": "http://a/rpc"}'),
    ("HUB_HOOK_TIMEOUT", "0.5", "hook_timeout", 0.5),
    ("HUB_HOOK_HEADERS", "Cookie,Authorization", "hook_headers", "Cookie,Authorization"),
    ("HUB_HOOK_STATIC_HEADERS", '{"X-Secret": "s"}', "hook_static_headers", '{"X-Secret": "s"}'),
    ("HUB_HOOK_CONCURRENCY", "8", "hook_concurrency", 8),
    ("HUB_HOOK_CONNECT_ALWAYS", "1", "hook_connect_always", True),
    ("HUB_ALLOWED_ORIGINS", "https://a.example", "allowed_origins", "https://a.example"),
    ("HUB_EVENTS_URL", "https://app.example/events", "events_url", "https://app.example/events"),
    ("HUB_EVENTS_SECRET", "ev3nts", "events_secret", "ev3nts"),
    ("HUB_EVENTS_MAX_PENDING", "50", "events_max_pending", 50),
    ("HUB_EVENTS_MAX_AGE", "3600", "events_max_age", 3600.0),
]


def test_defaults_make_a_single_loopback_node() -> None:
    settings = load_settings({}, {})
    assert (settings.host, settings.port, settings.redis_url) == ("127.0.0.1", 8000, None)
    assert settings.dev is False and settings.api_key is None
    assert settings.max_connections == 0 and settings.max_frame_bytes == 65536
    assert settings.queue_limit == 1000 and settings.max_subscriptions == 512
    assert settings.auth_timeout == 5 and settings.ping_interval == 25
    assert settings.drain_seconds == 10 and settings.drain_delay == 1
    assert settings.rate_limit == 100 and settings.recovery_max == 10000
    assert settings.presence_ttl == 30 and settings.jwt_require_exp is True
    assert (settings.log_level, settings.log_format) == ("info", "text")
    assert settings.namespaces == {}


def test_default_node_id_is_hostname_and_a_random_suffix() -> None:
    first, second = load_settings({}, {}).node_id, load_settings({}, {}).node_id
    assert first != second
    assert first.rsplit("-", 1)[0] == second.rsplit("-", 1)[0]


# What a variable cannot go without.
NEEDS = {"HUB_EVENTS_URL": {"HUB_EVENTS_SECRET": "s"}}


def test_every_field_has_a_variable_in_this_test() -> None:
    covered = {field for _, _, field, _ in EVERY_VARIABLE}
    assert covered == set(Settings.__struct_fields__) - {"namespaces", "config"}


@pytest.mark.parametrize(("variable", "raw", "field", "expected"), EVERY_VARIABLE,
                         ids=[row[0] for row in EVERY_VARIABLE])
def test_every_variable_is_read(variable: str, raw: str, field: str, expected: object) -> None:
    settings = load_settings({}, {variable: raw, **NEEDS.get(variable, {})})
    assert getattr(settings, field) == expected


def test_config_variable_is_read(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text('[namespaces.chat]\nsubscribe = "any"\n')
    settings = load_settings({}, {"HUB_CONFIG": str(config)})
    assert settings.namespaces["chat"].subscribe == "any"


def test_env_beats_default() -> None:
    assert load_settings({}, {"HUB_PORT": "9000"}).port == 9000


def test_flag_beats_env() -> None:
    env = {"HUB_PORT": "9000", "HUB_HOST": "10.0.0.1", "HUB_NODE_ID": "from-env"}
    settings = load_settings({"port": 9001, "host": "127.0.0.2", "node_id": "from-flag"}, env)
    assert (settings.port, settings.host, settings.node_id) == (9001, "127.0.0.2", "from-flag")


def test_flag_not_given_falls_back_to_env() -> None:
    settings = load_settings({"port": None, "dev": None}, {"HUB_PORT": "9000", "HUB_DEV": "1"})
    assert settings.port == 9000 and settings.dev is True


def test_flags_given_as_text_are_parsed_like_variables() -> None:
    assert load_settings({"port": "9002"}, {}).port == 9002


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " True "])
def test_bool_true_spellings(raw: str) -> None:
    assert load_settings({}, {"HUB_DEV": raw}).dev is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off", ""])
def test_bool_false_spellings(raw: str) -> None:
    assert load_settings({}, {"HUB_DEV": raw}).dev is False


def test_bool_garbage_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="HUB_DEV"):
        load_settings({}, {"HUB_DEV": "maybe"})


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("HUB_PORT", "abc"),
        ("HUB_PORT", "70000"),
        ("HUB_PORT", "-1"),
        ("HUB_MAX_CONNECTIONS", "1.5"),
        ("HUB_MAX_CONNECTIONS", "-1"),
        ("HUB_MAX_FRAME_BYTES", "10"),
        ("HUB_QUEUE_LIMIT", "0"),
        ("HUB_MAX_SUBSCRIPTIONS", "many"),
        ("HUB_AUTH_TIMEOUT", "0"),
        ("HUB_PING_INTERVAL", "soon"),
        ("HUB_DRAIN_SECONDS", "-1"),
        ("HUB_DRAIN_DELAY", "-0.5"),
        ("HUB_RATE_LIMIT", "-1"),
        ("HUB_RATE_LIMIT_GRACE", "-1"),
        ("HUB_RECOVERY_MAX", "x"),
        ("HUB_PRESENCE_TTL", "0"),
        ("HUB_JWT_REQUIRE_EXP", "sometimes"),
        ("HUB_LOG_LEVEL", "loud"),
        ("HUB_LOG_FORMAT", "xml"),
        ("HUB_JWT_PUBLIC_KEY", "/nonexistent/key.pem"),
        ("HUB_CONFIG", "/nonexistent/hub.toml"),
        ("HUB_CENTRIFUGO_API_PREFIX", "centrifugo/api"),
        ("HUB_CENTRIFUGO_API_PREFIX", "/centrifugo/api/"),
        ("HUB_CENTRIFUGO_API_PREFIX", "/a b"),
        ("HUB_CENTRIFUGO_API_PREFIX", "/api"),
    ],
)
def test_bad_value_names_the_option(variable: str, raw: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings({}, {variable: raw})


def test_port_zero_means_any_free_port() -> None:
    assert load_settings({"port": 0}, {}).port == 0


@pytest.mark.parametrize(
    "field",
    ["redis_url", "jwt_secret", "jwt_public_key", "jwks_url", "jwt_audience", "jwt_issuer",
     "api_key", "config"],
)
def test_empty_optional_variable_means_unset(field: str) -> None:
    assert getattr(load_settings({}, {"HUB_" + field.upper(): ""}), field) is None


def test_empty_node_id_gets_a_generated_one() -> None:
    assert load_settings({}, {"HUB_NODE_ID": ""}).node_id


def test_log_level_and_format_are_case_insensitive() -> None:
    settings = load_settings({}, {"HUB_LOG_LEVEL": "DEBUG", "HUB_LOG_FORMAT": "JSON"})
    assert (settings.log_level, settings.log_format) == ("debug", "json")


def test_public_key_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text(PEM)
    assert load_settings({}, {"HUB_JWT_PUBLIC_KEY": str(path)}).jwt_public_key == PEM


# TOML namespaces


def _config(tmp_path: Path, text: str) -> dict[str, Any]:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    return {"config": str(path)}


def test_namespaces_inherit_from_default_table(tmp_path: Path) -> None:
    flags = _config(tmp_path, """
[namespaces.default]
publish = "token"
history_size = 10
history_ttl = 60
presence = true

[namespaces.chat]
publish = "any"
join_leave = true
""")
    settings = load_settings(flags, {})
    chat = settings.namespaces["chat"]
    assert chat == Namespace(subscribe="token", publish="any", history_size=10, history_ttl=60,
                             presence=True, join_leave=True)
    assert settings.namespaces["default"] == Namespace(publish="token", history_size=10,
                                                       history_ttl=60, presence=True)


def test_namespace_of_a_channel(tmp_path: Path) -> None:
    flags = _config(tmp_path, """
[namespaces.default]
history_size = 5
history_ttl = 5

[namespaces.chat]
subscribe = "any"
""")
    settings = load_settings(flags, {})
    assert settings.namespace_of("chat:room").subscribe == "any"
    assert settings.namespace_of("chat:room").history_size == 5
    assert settings.namespace_of("room") == settings.namespaces["default"]
    assert settings.namespace_of("other:room") == settings.namespaces["default"]


def test_options_left_out_everywhere_come_from_builtin_defaults(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, "[namespaces.feed]\nhistory_size = 3\n"), {})
    assert settings.namespaces["feed"] == Namespace(history_size=3)
    assert not settings.namespaces["feed"].has_history  # history_ttl 0 = no history
    assert settings.namespace_of("room") == Namespace()


def test_config_flag_beats_variable(tmp_path: Path) -> None:
    flags = _config(tmp_path, '[namespaces.chat]\npublish = "any"\n')
    settings = load_settings(flags, {"HUB_CONFIG": "/nonexistent/hub.toml"})
    assert settings.namespaces["chat"].publish == "any"


@pytest.mark.parametrize(
    "text",
    [
        "[namespaces.chat\n",
        '[namespaces.chat]\nsubscribe = "everyone"\n',
        "[namespaces.chat]\nhistory_size = \"ten\"\n",
        "[namespaces.chat]\nhistory_size = -1\nhistory_ttl = 5\n",
        "[namespaces.chat]\nbogus = 1\n",
        "[namespaces]\nchat = 1\n",
        "namespaces = 1\n",
        "[server]\nport = 1\n",
    ],
    ids=["syntax", "bad-policy", "bad-type", "negative", "unknown-option", "not-a-table",
         "namespaces-not-a-table", "unknown-top-level"],
)
def test_bad_config_raises_naming_hub_config_or_namespace(tmp_path: Path, text: str) -> None:
    with pytest.raises(SettingsError, match=r"HUB_CONFIG|namespaces\."):
        load_settings(_config(tmp_path, text), {})

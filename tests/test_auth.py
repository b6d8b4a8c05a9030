"""PROTOCOL §2 end to end: where the token comes from, how it is verified (HS256, RS256,
ES256, JWKS), the close codes of a refusal, expiry and refresh while connected, and what the
claims grant."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hub.settings import Settings, load_settings
from tests.support import (
    SECRET,
    Client,
    RunningNode,
    api,
    connect,
    make_settings,
    metric,
    running_node,
    token,
)


def hs_token(claims: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    """An HS256 token with exactly these claims."""
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)


def hs256_with_raw_key(claims: dict[str, Any], key: bytes) -> str:
    """HS256 by hand, with any bytes as key (PyJWT refuses to sign with a PEM)."""

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = header + b"." + b64(json.dumps(claims).encode())
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + b64(signature)).decode()


def claims_for(user: str = "alice", ttl: int = 3600, **extra: Any) -> dict[str, Any]:
    return {"sub": user, "exp": int(time.time()) + ttl, **extra}


@contextlib.asynccontextmanager
async def refused(
    ws_url: str, jwt_text: str | None = None, **options: Any
) -> AsyncIterator[Client]:
    """A connection that is expected not to be welcomed (the test reads its close code)."""
    async with connect(ws_url, jwt_text, welcome=False, **options) as client:
        yield client


async def close_code_of(ws_url: str, jwt_text: str | None, **options: Any) -> int:
    async with refused(ws_url, jwt_text, **options) as client:
        return await client.closed()


def pem_of(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_settings(**overrides: Any) -> Settings:
    """Settings that verify with a public key or JWKS only (no shared secret)."""
    return make_settings(jwt_secret=None, **overrides)


# Where the token comes from


async def test_token_in_authorization_header_is_welcomed(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice")) as client:
        welcome = client.welcome
        assert welcome["user"] == "alice"
        assert welcome["node"] == "test-node"
        assert isinstance(welcome["client"], str) and welcome["client"]
        assert isinstance(welcome["expires"], int) and welcome["expires"] > time.time()
        assert welcome["ping_interval"] == 25
        assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_token_in_query_parameter_is_welcomed(node: RunningNode) -> None:
    async with connect(node.ws_url, token("bob"), header=False) as client:
        assert client.welcome["user"] == "bob"


async def test_token_in_first_auth_frame_is_welcomed_before_anything_else(
    node: RunningNode,
) -> None:
    async with connect(node.ws_url, welcome=False) as client:
        await client.send({"type": "auth", "token": token("carol")})
        welcome = await client.expect("welcome")
        assert welcome["user"] == "carol"
        await client.send({"type": "ping", "id": 1})
        assert await client.expect("pong") == {"type": "pong", "id": 1}


async def test_a_welcome_for_an_auth_frame_echoes_its_id(node: RunningNode) -> None:
    async with connect(node.ws_url, welcome=False) as client:
        await client.send({"type": "auth", "token": token("dora"), "id": 7})
        welcome = await client.expect("welcome")
        assert (welcome["user"], welcome["id"]) == ("dora", 7)
    async with connect(node.ws_url, token("erin")) as client:
        assert "id" not in client.welcome  # no command to answer


async def test_header_token_wins_over_query_token(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice"), query="token=garbage") as client:
        assert client.welcome["user"] == "alice"
    # The header is looked at first: a bad one is not rescued by a good query token.
    connection = await websockets.connect(
        node.ws_url + f"?token={token('alice')}",
        additional_headers={"Authorization": "Bearer garbage"}, open_timeout=5,
    )
    try:
        assert await Client(connection).closed() == 4001
    finally:
        await connection.close()


# Refusals


async def test_invalid_token_closes_4001(node: RunningNode) -> None:
    assert await close_code_of(node.ws_url, "not-a-jwt") == 4001


async def test_token_signed_with_another_secret_closes_4001(node: RunningNode) -> None:
    forged = hs_token(claims_for(), secret="another-secret-0123456789-abcdefghijkl")
    assert await close_code_of(node.ws_url, forged) == 4001


async def test_expired_token_closes_4002(node: RunningNode) -> None:
    assert await close_code_of(node.ws_url, hs_token(claims_for(ttl=-10))) == 4002


async def test_expired_token_in_auth_frame_closes_4002(node: RunningNode) -> None:
    async with refused(node.ws_url) as client:
        await client.send({"type": "auth", "token": hs_token(claims_for(ttl=-10))})
        assert await client.closed() == 4002


async def test_no_token_and_no_auth_frame_closes_4001_after_auth_timeout() -> None:
    async with running_node(make_settings(auth_timeout=0.3)) as running:
        started = time.monotonic()
        assert await close_code_of(running.ws_url, None) == 4001
        assert 0.25 <= time.monotonic() - started < 3
        assert await metric(running, "hub_auth_failures_total", reason="timeout") == 1


async def test_first_frame_other_than_auth_closes_4001(node: RunningNode) -> None:
    async with refused(node.ws_url) as client:
        await client.send({"type": "subscribe", "channel": "chat:room", "id": 1})
        assert await client.closed() == 4001


async def test_malformed_first_frame_closes_4001(node: RunningNode) -> None:
    async with refused(node.ws_url) as client:
        await client.connection.send("{not json")
        assert await client.closed() == 4001


async def test_auth_frame_with_bad_token_closes_4001(node: RunningNode) -> None:
    async with refused(node.ws_url) as client:
        await client.send({"type": "auth", "token": "garbage"})
        assert await client.closed() == 4001


async def test_token_without_sub_closes_4001(node: RunningNode) -> None:
    assert await close_code_of(node.ws_url, hs_token({"exp": int(time.time()) + 60})) == 4001


async def test_token_with_bad_sub_closes_4001(node: RunningNode) -> None:
    for sub in ("", "x" * 129, 42, None, ["alice"]):
        claims = {"sub": sub, "exp": int(time.time()) + 60}
        assert await close_code_of(node.ws_url, hs_token(claims)) == 4001, sub


async def test_token_without_exp_closes_4001_by_default(node: RunningNode) -> None:
    assert await close_code_of(node.ws_url, hs_token({"sub": "alice"})) == 4001


async def test_token_without_exp_is_welcomed_when_exp_is_not_required() -> None:
    async with (
        running_node(make_settings(jwt_require_exp=False)) as running,
        connect(running.ws_url, hs_token({"sub": "alice"})) as client,
    ):
        assert client.welcome["user"] == "alice"
        assert client.welcome["expires"] is None


async def test_token_not_yet_valid_closes_4001(node: RunningNode) -> None:
    early = hs_token(claims_for(nbf=int(time.time()) + 600))
    assert await close_code_of(node.ws_url, early) == 4001


async def test_unsigned_token_closes_4001(node: RunningNode) -> None:
    unsigned = jwt.encode(claims_for(), None, algorithm="none")  # type: ignore[arg-type]
    assert await close_code_of(node.ws_url, unsigned) == 4001


async def test_auth_failures_are_counted_by_reason(node: RunningNode) -> None:
    before_expired = await metric(node, "hub_auth_failures_total", reason="expired")
    before_invalid = await metric(node, "hub_auth_failures_total", reason="invalid")
    before_4002 = await metric(node, "hub_disconnections_total", code="4002")
    assert await close_code_of(node.ws_url, hs_token(claims_for(ttl=-10))) == 4002
    assert await close_code_of(node.ws_url, "garbage") == 4001
    assert await close_code_of(node.ws_url, "garbage.again") == 4001
    assert await metric(node, "hub_auth_failures_total", reason="expired") == before_expired + 1
    assert await metric(node, "hub_auth_failures_total", reason="invalid") == before_invalid + 2
    assert await metric(node, "hub_disconnections_total", code="4002") == before_4002 + 1
    assert await metric(node, "hub_connections_accepted_total") == 0


# Dev mode


async def test_dev_mode_welcomes_without_token_with_user_from_query() -> None:
    async with (
        running_node(make_settings(dev=True)) as running,
        connect(running.ws_url, query="user=bob") as client,
    ):
        assert client.welcome["user"] == "bob"
        assert client.welcome["expires"] is None
        # Dev mode opens every channel but the personal ones.
        await client.subscribe("anything:at-all")
        reply = await client.request({"type": "publish", "channel": "x", "data": 1})
        assert reply["type"] == "published"
        reply = await client.request({"type": "subscribe", "channel": "@bob"})
        assert reply["code"] == "forbidden"


async def test_dev_mode_without_user_gets_a_random_id() -> None:
    async with (
        running_node(make_settings(dev=True)) as running,
        connect(running.ws_url) as first,
        connect(running.ws_url) as second,
    ):
        assert first.welcome["user"]
        assert second.welcome["user"]
        assert first.welcome["user"] != second.welcome["user"]


async def test_dev_mode_still_verifies_a_given_token() -> None:
    async with running_node(make_settings(dev=True)) as running:
        assert await close_code_of(running.ws_url, "garbage") == 4001
        assert await close_code_of(running.ws_url, "garbage", header=False) == 4001
        async with connect(running.ws_url, token("dave"), query="user=bob") as client:
            assert client.welcome["user"] == "dave"


# Expiry and refresh


async def test_token_expiring_while_connected_closes_4002(node: RunningNode) -> None:
    expires = int(time.time()) + 2
    async with connect(node.ws_url, hs_token({"sub": "alice", "exp": expires})) as client:
        assert client.welcome["expires"] == expires
        assert await client.closed(timeout=5) == 4002
        assert time.time() >= expires - 0.05


async def test_each_connection_closes_at_its_own_expiry(node: RunningNode) -> None:
    """One clock for the node: a connection that comes later with an earlier expiry is
    closed first, and the other at its own time."""
    now = int(time.time())
    async with connect(node.ws_url, hs_token({"sub": "late", "exp": now + 2})) as late, \
            connect(node.ws_url, hs_token({"sub": "early", "exp": now + 1})) as early:
        assert await early.closed(timeout=5) == 4002
        assert time.time() < now + 2
        assert (await late.request({"type": "ping"}))["type"] == "pong"
        assert await late.closed(timeout=5) == 4002
        assert time.time() >= now + 2 - 0.05


async def test_refresh_before_expiry_keeps_the_connection(node: RunningNode) -> None:
    old_expiry = int(time.time()) + 2
    old_token = hs_token({"sub": "alice", "exp": old_expiry, "channels": ["room1"]})
    async with connect(node.ws_url, old_token) as client:
        await client.subscribe("room1")
        new_expiry = int(time.time()) + 3600
        reply = await client.request(
            {"type": "refresh", "token": hs_token({"sub": "alice", "exp": new_expiry})}
        )
        assert reply["type"] == "refreshed"
        assert reply["expires"] == new_expiry
        # Nothing can be awaited for "not closed": wait out the old expiry, then check.
        await asyncio.sleep(max(0.0, old_expiry + 0.5 - time.time()))
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        response = await api(node).post("/api/publish", json={"channel": "room1", "data": 1})
        assert response.status_code == 200
        message = await client.expect("message")
        assert (message["channel"], message["data"]) == ("room1", 1)


async def test_refresh_replaces_the_rights_of_the_connection(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice", channels=["room1"])) as client:
        assert (await client.request({"type": "subscribe", "channel": "room2"}))["code"] == (
            "forbidden"
        )
        reply = await client.request(
            {"type": "refresh", "token": token("alice", channels=["room*"])}
        )
        assert reply["type"] == "refreshed"
        await client.subscribe("room2")


async def test_refresh_for_another_sub_is_forbidden_and_changes_nothing(
    node: RunningNode,
) -> None:
    expiry = int(time.time()) + 2
    async with connect(node.ws_url, hs_token({"sub": "alice", "exp": expiry})) as client:
        reply = await client.request({"type": "refresh", "token": token("mallory")})
        assert reply["type"] == "error"
        assert reply["code"] == "forbidden"
        assert (await client.request({"type": "ping"}))["type"] == "pong"
        # Still alice's old token: it expires when it did.
        assert await client.closed(timeout=5) == 4002


async def test_refresh_with_bad_token_is_forbidden(node: RunningNode) -> None:
    bad_tokens = {
        "garbage": "garbage",
        "expired": hs_token(claims_for(ttl=-10)),
        "other-secret": hs_token(
            claims_for(channels=["*"]), secret="another-secret-0123456789-abcdefghijkl"
        ),
        "empty": "",
    }
    async with connect(node.ws_url, token("alice", channels=["room1"])) as client:
        for name, bad in bad_tokens.items():
            reply = await client.request({"type": "refresh", "token": bad})
            assert reply["type"] == "error", name
            assert reply["code"] == "forbidden", name
        # The old token's rights are still the rights.
        assert (await client.request({"type": "subscribe", "channel": "room2"}))["code"] == (
            "forbidden"
        )
        await client.subscribe("room1")


# Claims


async def test_channels_claim_globs_decide_subscriptions(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice", channels=["news:*"])) as client:
        await client.subscribe("news:sport")
        await client.subscribe("news:world")
        for channel in ("other", "news", "newsroom:x"):
            reply = await client.request({"type": "subscribe", "channel": channel})
            assert reply["type"] == "error", channel
            assert reply["code"] == "forbidden", channel
        # A namespace with subscribe=any ignores the claim.
        await client.subscribe("chat:room")


async def test_token_without_channels_claim_may_not_subscribe_in_a_token_namespace(
    node: RunningNode,
) -> None:
    async with connect(node.ws_url, hs_token(claims_for())) as client:
        reply = await client.request({"type": "subscribe", "channel": "news"})
        assert reply["code"] == "forbidden"


async def test_publish_claim_decides_publishing_in_a_token_namespace(node: RunningNode) -> None:
    async with connect(node.ws_url, token("alice", publish=["feed:mine*"])) as client:
        reply = await client.request({"type": "publish", "channel": "feed:mine1", "data": {}})
        assert reply["type"] == "published"
        assert reply["offset"] == 1
        reply = await client.request({"type": "publish", "channel": "feed:theirs", "data": {}})
        assert reply["code"] == "forbidden"
        # The default namespace is publish=none: no claim opens it.
        reply = await client.request({"type": "publish", "channel": "room", "data": {}})
        assert reply["code"] == "forbidden"


async def test_info_claim_is_shown_in_presence(node: RunningNode) -> None:
    info = {"name": "Alice", "roles": ["admin"], "avatar": None}
    async with connect(node.ws_url, token("alice", info=info)) as client:
        await client.subscribe("chat:lobby")
        reply = await client.request({"type": "presence", "channel": "chat:lobby"})
        assert reply["clients"] == [
            {"client": client.welcome["client"], "user": "alice", "info": info}
        ]


async def test_info_claim_over_1_kib_closes_4001(node: RunningNode) -> None:
    assert await close_code_of(node.ws_url, token("alice", info={"blob": "x" * 1100})) == 4001


async def test_info_claim_that_is_not_an_object_closes_4001(node: RunningNode) -> None:
    assert await close_code_of(node.ws_url, hs_token(claims_for(info=["a"]))) == 4001


async def test_channels_or_publish_claim_that_is_not_a_list_of_strings_closes_4001(
    node: RunningNode,
) -> None:
    for claims in ({"channels": "news:*"}, {"channels": [1]}, {"publish": {"a": 1}}):
        assert await close_code_of(node.ws_url, hs_token(claims_for(**claims))) == 4001, claims


async def test_audience_and_issuer_are_checked_when_configured() -> None:
    settings = make_settings(jwt_audience="hub", jwt_issuer="https://auth.example")
    good = {"aud": "hub", "iss": "https://auth.example"}
    async with running_node(settings) as running:
        async with connect(running.ws_url, hs_token({**claims_for(), **good})) as client:
            assert client.welcome["user"] == "alice"
        for claims in (
            {"aud": "other", "iss": "https://auth.example"},
            {"aud": "hub", "iss": "https://evil.example"},
            {"iss": "https://auth.example"},
            {"aud": "hub"},
        ):
            assert await close_code_of(running.ws_url, hs_token({**claims_for(), **claims})) == 4001


async def test_audience_is_not_required_when_not_configured(node: RunningNode) -> None:
    async with connect(node.ws_url, hs_token(claims_for(aud="anything"))) as client:
        assert client.welcome["user"] == "alice"


# Public keys and JWKS


async def test_rs256_public_key_pem_text(rsa_key: rsa.RSAPrivateKey) -> None:
    async with running_node(key_settings(jwt_public_key=pem_of(rsa_key))) as running:
        signed = jwt.encode(claims_for("rsa-user"), rsa_key, algorithm="RS256")
        async with connect(running.ws_url, signed) as client:
            assert client.welcome["user"] == "rsa-user"
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = jwt.encode(claims_for("rsa-user"), other, algorithm="RS256")
        assert await close_code_of(running.ws_url, forged) == 4001
        # No shared secret configured: HS256 is refused, also one keyed with the public
        # key itself (the algorithm confusion attack).
        assert await close_code_of(running.ws_url, token("alice")) == 4001
        confused = hs256_with_raw_key(claims_for(), pem_of(rsa_key).encode())
        assert await close_code_of(running.ws_url, confused) == 4001
        expired = jwt.encode(claims_for(ttl=-10), rsa_key, algorithm="RS256")
        assert await close_code_of(running.ws_url, expired) == 4002


async def test_es256_public_key_pem_text(ec_key: ec.EllipticCurvePrivateKey) -> None:
    async with running_node(key_settings(jwt_public_key=pem_of(ec_key))) as running:
        signed = jwt.encode(claims_for("ec-user"), ec_key, algorithm="ES256")
        async with connect(running.ws_url, signed) as client:
            assert client.welcome["user"] == "ec-user"
        other = ec.generate_private_key(ec.SECP256R1())
        forged = jwt.encode(claims_for("ec-user"), other, algorithm="ES256")
        assert await close_code_of(running.ws_url, forged) == 4001


async def test_public_key_from_a_file_path(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_text(pem_of(rsa_key))
    loaded = load_settings(environ={"HUB_JWT_PUBLIC_KEY": str(key_file), "HUB_NODE_ID": "n1"})
    assert loaded.jwt_public_key == pem_of(rsa_key)
    settings = msgspec.structs.replace(loaded, port=0, drain_delay=0, drain_seconds=0.5)
    async with running_node(settings) as running:
        signed = jwt.encode(claims_for("file-user"), rsa_key, algorithm="RS256")
        async with connect(running.ws_url, signed) as client:
            assert client.welcome["user"] == "file-user"


class _JwksServer:
    """A JWKS document served over HTTP from a thread, counting its fetches."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def jwks(rsa_key: rsa.RSAPrivateKey) -> Iterator[_JwksServer]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwk.update(kid="key-1", use="sig", alg="RS256")
    served = _JwksServer({"keys": [jwk]})
    served.thread.start()
    try:
        yield served
    finally:
        served.server.shutdown()
        served.server.server_close()


async def test_jwks_url_verifies_tokens_by_kid(
    jwks: _JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    async with running_node(key_settings(jwks_url=jwks.url)) as running:
        signed = jwt.encode(claims_for("jwks-user"), rsa_key, algorithm="RS256",
                            headers={"kid": "key-1"})
        async with connect(running.ws_url, signed) as client:
            assert client.welcome["user"] == "jwks-user"
        async with connect(running.ws_url, signed) as client:
            assert client.welcome["user"] == "jwks-user"
        assert jwks.fetches == 1  # cached
        unknown_kid = jwt.encode(claims_for(), rsa_key, algorithm="RS256",
                                 headers={"kid": "key-2"})
        assert await close_code_of(running.ws_url, unknown_kid) == 4001
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = jwt.encode(claims_for(), other, algorithm="RS256", headers={"kid": "key-1"})
        assert await close_code_of(running.ws_url, forged) == 4001


async def test_unreachable_jwks_url_closes_4001(rsa_key: rsa.RSAPrivateKey) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    settings = key_settings(jwks_url=f"http://127.0.0.1:{port}/jwks.json")
    async with running_node(settings) as running:
        signed = jwt.encode(claims_for(), rsa_key, algorithm="RS256", headers={"kid": "key-1"})
        assert await close_code_of(running.ws_url, signed) == 4001


async def test_a_long_non_ascii_algorithm_still_closes_4001(node: RunningNode) -> None:
    """The close reason echoes what was wrong; it must still fit a close frame."""
    header = base64.urlsafe_b64encode(json.dumps({"alg": "é" * 100}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(b'{"sub":"x"}').rstrip(b"=")
    forged = b".".join((header, body, b"c2ln")).decode()
    assert await close_code_of(node.ws_url, forged) == 4001

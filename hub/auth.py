"""JWT verification (PROTOCOL §2): HS256 secret, RS256/ES256 public key, or a JWKS URL.

A verified token becomes an `Identity`; anything else raises `AuthFailed` carrying the
close code and the metric reason.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import msgspec

from hub.errors import CloseCode
from hub.settings import Settings

_MAX_INFO_BYTES = 1024
_ASYMMETRIC = ("RS256", "ES256")


class Identity(msgspec.Struct, frozen=True):
    user: str
    expires: int | None = None
    channels: tuple[str, ...] = ()
    publish: tuple[str, ...] = ()
    info: msgspec.Raw | None = None


class AuthFailed(Exception):
    def __init__(self, reason: str, message: str, code: CloseCode = CloseCode.UNAUTHORIZED) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


class Authenticator:
    """Verifies tokens with the keys the settings name; JWKS keys are fetched off the loop
    and cached by PyJWKClient."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._jwks = (
            jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300, timeout=5)
            if settings.jwks_url
            else None
        )

    @property
    def configured(self) -> bool:
        s = self._settings
        return bool(s.jwt_secret or s.jwt_public_key or s.jwks_url)

    async def verify(self, token: str, *, anonymous: bool = False) -> Identity:
        """`anonymous`: a token without `sub` is an anonymous user (empty user id), as
        Centrifugo's protocol allows when configured (HUB_ANONYMOUS)."""
        if not token:
            raise AuthFailed("missing", "no token")
        required = ["exp"] if self._settings.jwt_require_exp else []
        claims = await self._claims(token, required if anonymous else ["sub", *required])
        if anonymous and not claims.get("sub"):
            claims["sub"] = ""
            return _identity(claims, anonymous=True)
        return _identity(claims)

    async def verify_subscription(self, token: str, user: str, channel: str) -> Identity:
        """A subscription token (Centrifugo's protocol): signed like connect tokens, `sub`
        the connection's user (empty for an anonymous one), `channel` the channel; `exp`
        optional. The Identity carries its expiry and `info`."""
        if not token:
            raise AuthFailed("missing", "no token")
        claims = await self._claims(token, ["channel"])
        if claims.get("sub", "") != user:
            raise AuthFailed("invalid", "subscription token of another user")
        if claims.get("channel") != channel:
            raise AuthFailed("invalid", "subscription token of another channel")
        expires = claims.get("exp")
        if expires is not None and not isinstance(expires, int | float):
            raise AuthFailed("invalid", "claim `exp` must be a number")
        return Identity(user=user, expires=int(expires) if expires is not None else None,
                        info=_info(claims.get("info")))

    async def _claims(self, token: str, required: list[str]) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthFailed("invalid", f"malformed token: {exc}") from None
        algorithm = header.get("alg")
        key = await self._key_for(algorithm, token)
        return self._decode(token, key, algorithm, required)

    async def _key_for(self, algorithm: object, token: str) -> Any:
        s = self._settings
        if algorithm == "HS256" and s.jwt_secret:
            return s.jwt_secret
        if algorithm in _ASYMMETRIC and s.jwt_public_key:
            return s.jwt_public_key
        if algorithm in _ASYMMETRIC and self._jwks is not None:
            try:
                signing_key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
            except jwt.PyJWTError as exc:
                raise AuthFailed("invalid", f"no matching JWKS key: {exc}") from None
            return signing_key.key
        raise AuthFailed("invalid", f"token algorithm {ascii(algorithm)[:24]} is not accepted")

    def _decode(
        self, token: str, key: Any, algorithm: object, required: list[str]
    ) -> dict[str, Any]:
        s = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[str(algorithm)],
                audience=s.jwt_audience,
                issuer=s.jwt_issuer,
                options={"require": required, "verify_aud": s.jwt_audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthFailed("expired", "token expired", CloseCode.TOKEN_EXPIRED) from None
        except jwt.PyJWTError as exc:
            raise AuthFailed("invalid", f"invalid token: {exc}") from None
        return claims


def _identity(claims: dict[str, Any], anonymous: bool = False) -> Identity:
    user = claims.get("sub")
    if not isinstance(user, str) or not (0 if anonymous else 1) <= len(user) <= 128:
        raise AuthFailed("invalid", "claim `sub` must be a string of 1-128 characters")
    expires = claims.get("exp")
    if expires is not None and not isinstance(expires, int | float):
        raise AuthFailed("invalid", "claim `exp` must be a number")
    return Identity(
        user=user,
        expires=int(expires) if expires is not None else None,
        channels=_patterns(claims, "channels"),
        publish=_patterns(claims, "publish"),
        info=_info(claims.get("info")),
    )


def _patterns(claims: dict[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise AuthFailed("invalid", f"claim `{name}` must be a list of strings")
    return tuple(value)


def _info(value: object) -> msgspec.Raw | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise AuthFailed("invalid", "claim `info` must be a JSON object")
    encoded = msgspec.json.encode(value)
    if len(encoded) > _MAX_INFO_BYTES:
        raise AuthFailed("invalid", "claim `info` is over 1 KiB")
    return msgspec.Raw(encoded)


def mint_token(
    secret: str,
    user: str,
    *,
    ttl: float | None = 3600,
    channels: list[str] | None = None,
    publish: list[str] | None = None,
    info: dict[str, Any] | None = None,
) -> str:
    """An HS256 token, for `hub token`, tests and benchmarks."""
    now = time.time()  # read once: `exp - iat` is exactly the ttl
    claims: dict[str, Any] = {"sub": user, "iat": int(now)}
    if ttl is not None:
        claims["exp"] = int(now + ttl)
    if channels:
        claims["channels"] = channels
    if publish:
        claims["publish"] = publish
    if info is not None:
        claims["info"] = info
    return jwt.encode(claims, secret, algorithm="HS256")

"""Centrifugo's client protocol v2 on `/connection/websocket`, once connected (PROTOCOL
§11): commands in a frame, each answered by id, and what channels carry as pushes, in the
connection's encoding (`hub.centrifugo_codecs`: JSON or Protobuf). The same hub as `/ws`:
the same commands (`hub.commands`), the same subscriptions, limits and metrics; only the
words differ. What the SDKs need of each reply is in docs/centrifugo-notes.md; the frames
are `hub.centrifugo_frames`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable

import msgspec

from hub import centrifugo_frames as cf
from hub import protocol as p
from hub.abuse import decode_reason
from hub.auth import AuthFailed, Identity
from hub.broker import StreamPosition
from hub.centrifugo_codecs import (
    JSON_CODEC,
    CentrifugoCodec,
    centrifugo_personal,
    client_info,
    publication,
)
from hub.channels import personal_channel
from hub.commands import ClientCommands
from hub.errors import CloseCode, ErrorCode, HubError
from hub.fossil import create as fossil_delta
from hub.hooks import HookRefused
from hub.node import HISTORY_LIMIT
from hub.session import Session
from hub.subscriptions import Joined
from hub.wire import Outbound

log = logging.getLogger("hub.centrifugo")

CENTRIFUGO_CODEC = JSON_CODEC
PING_FRAME = JSON_CODEC.ping_frame
REJECT_UNRECOVERED = 2
"""Subscribe `flag` bit (Centrifugo >= 6.8): answer 112 rather than subscribe unrecovered."""
FOSSIL = "fossil"


class CentrifugoSession(Session):
    __slots__ = ("codec", "pong_due", "sub_expiries")

    def __init__(
        self,
        commands: ClientCommands,
        outbound: Outbound,
        client_id: str,
        identity: Identity,
        codec: CentrifugoCodec = JSON_CODEC,
    ) -> None:
        super().__init__(commands, outbound, client_id, identity)
        self.codec: CentrifugoCodec = codec
        self.pong_due = False  # pinged, and no `{}` back yet
        # Channels subscribed with a subscription token that expires: when (unix s).
        self.sub_expiries: dict[str, int] | None = None

    # outbound

    def answer(self, reply: cf.Reply) -> None:
        self.push(self.codec.reply(reply))

    def fail(self, command_id: int, error: HubError) -> None:
        self.count_error(error.code)
        if isinstance(error, HookRefused):  # the application's own code and message
            refused = error.error
            self.answer(cf.Reply(id=command_id, error=cf.Error(
                code=refused.code, message=error.message, temporary=refused.temporary)))
            return
        self.answer(cf.hub_error_reply(command_id, error))

    def subscription_expired(self, channel: str) -> None:
        push = cf.unsubscribe_push(channel, cf.UnsubscribeCode.EXPIRED)
        self.push(self.codec.push(push))

    def reset(self, channel: str, position: StreamPosition) -> bool:
        """The subscription ends here (it is dropped first), and the SDK subscribes again
        with its last position: `recovered: false` tells the app to reload (PROTOCOL §11)."""
        self.push(self.codec.push(cf.unsubscribe_push(channel)))
        return False

    def wire_close(self, code: int, reason: str) -> tuple[int, str]:
        mapped = cf.HUB_CLOSES.get(code)
        if mapped is not None:
            return mapped
        if 3000 <= code < 5000:  # /api/disconnect's own code
            return code, reason or cf.reason_for(code)
        return cf.DisconnectCode.FORCE_NO_RECONNECT, cf.reason_for(
            cf.DisconnectCode.FORCE_NO_RECONNECT
        )

    def connected(
        self, command_id: int, node_version: str, ping_interval: float,
        data: msgspec.Raw | None = None, channels: Iterable[str] = (),
        session: str = "", node: str = "",
    ) -> None:
        """The connect reply: it comes first, and lists the personal channel under both
        its names (the SDKs drop pushes of channels they were not told of) and the connect
        hook's channels; an anonymous connection has no personal channel. Where the
        default namespace announces joins, the connection hears its own join to `#user`,
        as Centrifugo's server-side subscription gives. A connection the connect hook let
        in is refreshed by the server (the refresh hook), so its SDK is told of no
        expiry. An emulated session's `session` and `node` are what its `/emulation` POSTs
        name (PROTOCOL §15)."""
        by_hook = self.hook is not None and self.hook.hooked
        expires, ttl = (False, 0) if by_hook else self._lifetime(self.identity)
        ping = math.ceil(ping_interval) if ping_interval else 0
        subs: dict[str, cf.SubscribeResult] | None = None
        if self.user:
            subs = {centrifugo_personal(self.user): cf.SubscribeResult(),
                    personal_channel(self.user): cf.SubscribeResult()}
        if channels:
            subs = subs or {}
            subs.update((channel, cf.SubscribeResult()) for channel in channels)
        result = cf.ConnectResult(
            client=self.client_id, version=node_version, expires=expires, ttl=ttl,
            subs=subs, ping=ping, pong=bool(ping), data=data, session=session, node=node,
        )
        self.answer(cf.Reply(id=command_id, connect=result))
        if self.user and self.permissions.namespace(centrifugo_personal(self.user)).join_leave:
            info = client_info(self.user, self.client_id, self.identity.info)
            join = cf.Push(channel=centrifugo_personal(self.user), join=cf.Join(info=info))
            self.push(self.codec.push(join))

    @staticmethod
    def _lifetime(identity: Identity) -> tuple[bool, int]:
        if identity.expires is None:
            return False, 0
        return True, cf.token_ttl(identity.expires, time.time())

    # inbound

    async def handle(self, text: str) -> None:
        if self.codec.binary:
            self._protocol_error("bad_command")
            self.close(cf.DisconnectCode.BAD_REQUEST, "bad request")
            return
        await self.handle_messages(cf.split_frame(text))

    async def handle_binary(self, data: bytes) -> None:
        """The Protobuf encoding's frames; on a JSON connection, refused as `/ws` does."""
        if not self.codec.binary:
            await super().handle_binary(data)
            return
        messages, problem = self.codec.split(data)
        await self.handle_messages(messages)
        if problem is not None and self.close_code is None:
            self.commands.metrics.protocol_errors.count("bad_command")
            self.close(cf.DisconnectCode.BAD_REQUEST, "bad request")

    async def handle_messages(self, messages: list[bytes]) -> None:
        """Commands in order: centrifuge-js sends `connect` and its subscribes in one frame."""
        for message in messages:
            if self.close_code is not None:
                return
            try:
                command = self.codec.decode(message)
            except cf.BadCommand as exc:
                reason = "bad_command" if self.codec.binary else decode_reason(message, exc)
                self.commands.metrics.protocol_errors.count(reason)
                if exc.command_id is None:
                    self.close(cf.DisconnectCode.BAD_REQUEST, "bad request")
                    return
                self.fail(exc.command_id, exc)
                continue
            await self.execute(command)

    async def execute(self, command: cf.Command) -> None:
        if command.is_pong:
            self.pong_due = False
            return
        method = command.method
        if command.id == 0:
            if method != "send":  # a command without id: Centrifuge closes on it too
                self._protocol_error("bad_command")
                self.close(cf.DisconnectCode.BAD_REQUEST, "bad request")
            return
        if not self.allow():
            if self.close_code is None:
                self.fail(command.id, HubError(ErrorCode.RATE_LIMITED, "too many requests"))
            return
        try:
            await self._run(command, method)
        except HubError as exc:
            self.fail(command.id, exc)
        except Exception:
            log.exception("command failed", extra={"client": self.client_id, "user": self.user})
            self.fail(command.id, HubError(ErrorCode.INTERNAL, "internal error"))

    async def _run(self, command: cf.Command, method: str | None) -> None:
        commands, command_id = self.commands, command.id
        if method == "subscribe" and command.subscribe is not None:
            await self._subscribe(command_id, command.subscribe)
        elif method == "sub_refresh" and command.sub_refresh is not None:
            await self._sub_refresh(command_id, command.sub_refresh)
        elif method == "unsubscribe" and command.unsubscribe is not None:
            # Always a success: both SDKs reconnect on an unsubscribe error.
            if self.sub_expiries is not None:
                self.sub_expiries.pop(command.unsubscribe.channel, None)
            with contextlib.suppress(HubError):
                await commands.unsubscribe(self, command.unsubscribe.channel)
            self.answer(cf.Reply(id=command_id, unsubscribe=cf.UnsubscribeResult()))
        elif method == "publish" and command.publish is not None:
            request_publish = command.publish
            if request_publish.channel == centrifugo_personal(self.user) and self.user:
                await self._publish_personal(request_publish.data)
            else:
                await commands.publish(self, request_publish.channel, request_publish.data,
                                       None)
            self.answer(cf.Reply(id=command_id, publish=cf.PublishResult()))
        elif method == "presence" and command.presence is not None:
            channel = command.presence.channel
            members = await commands.presence(self, channel, granted=self._subscribed(channel))
            presence = {m.client: client_info(m.user, m.client, m.info) for m in members}
            self.answer(cf.Reply(id=command_id, presence=cf.PresenceResult(presence)))
        elif method == "presence_stats" and command.presence_stats is not None:
            channel = command.presence_stats.channel
            members = await commands.presence(self, channel, granted=self._subscribed(channel))
            stats = cf.PresenceStatsResult(len(members), len({m.user for m in members}))
            self.answer(cf.Reply(id=command_id, presence_stats=stats))
        elif method == "history" and command.history is not None:
            history = await self._history(command.history)
            if history is None:
                code = cf.ErrorCode.UNRECOVERABLE_POSITION
                self.answer(cf.error_reply(command_id, code))
            else:
                self.answer(cf.Reply(id=command_id, history=history))
        elif method == "refresh" and command.refresh is not None:
            await self._refresh(command_id, command.refresh.token)
        elif method == "rpc" and command.rpc is not None:
            if not commands.node.hooks.has("rpc"):
                self.answer(cf.error_reply(command_id, cf.ErrorCode.NOT_AVAILABLE))
                return
            data = await commands.rpc(self, command.rpc.method, command.rpc.data)
            self.answer(cf.Reply(id=command_id, rpc=cf.RPCResult(data=data)))
        elif method == "connect":
            self._protocol_error("bad_command")
            self.close(cf.DisconnectCode.BAD_REQUEST, "client already authenticated")
        else:
            self._protocol_error("unknown_command")
            self.fail(command_id, HubError(ErrorCode.UNKNOWN_TYPE, "method not found"))

    def _subscribed(self, channel: str) -> bool:
        """A subscriber may read a channel's history and presence, as Centrifugo's
        `allow_history_for_subscriber` and `allow_presence_for_subscriber` have it (its
        subscription token may be all that allowed it in)."""
        return self.commands.node.subscriptions.has(self, channel)

    def _protocol_error(self, reason: str) -> None:
        self.commands.metrics.protocol_errors.count(reason)

    async def _subscribe(self, command_id: int, request: cf.SubscribeRequest) -> None:
        """Centrifugo's subscribe: a subscription token grants what the namespace would
        not (103 when invalid, 109 when expired); `recover` with an empty epoch means the
        current one; `flag` 2 answers 112 rather than subscribe unrecovered; `delta`
        "fossil" where the namespace allows it."""
        channel = request.channel
        granted, expires = False, None
        if request.token:
            try:
                sub_identity = await self.commands.node.authenticator.verify_subscription(
                    request.token, self.user, channel)
            except AuthFailed as exc:
                self.answer(cf.error_reply(command_id, _token_error(exc)))
                return
            granted, expires = True, sub_identity.expires
            if expires is not None and cf.token_ttl(expires, time.time()) < 1:
                self.answer(cf.error_reply(command_id, cf.ErrorCode.TOKEN_EXPIRED))
                return
        if request.delta and request.delta != FOSSIL:
            self._protocol_error("bad_command")
            self.close(cf.DisconnectCode.BAD_REQUEST, "unknown delta type")
            return
        since = request.since
        if since is not None and not since.epoch:
            since = p.Since(since.offset, await self._current_epoch(channel))
        namespace = self.permissions.namespace(channel)
        delta = bool(request.delta) and FOSSIL in namespace.allowed_delta_types
        rejected: list[bool] = []
        joined = self._joined(command_id, request, since, delta, expires, rejected)
        await self.commands.subscribe(self, channel, since, joined, granted=granted,
                                      delta=delta, data=request.data)
        if rejected:  # answered 112: the subscription does not stand
            with contextlib.suppress(HubError):
                await self.commands.unsubscribe(self, channel)
        elif expires is not None:
            self._watch_subscription(channel, expires)

    async def _current_epoch(self, channel: str) -> str:
        """The epoch a channel with history is in ("" without history)."""
        if not self.permissions.namespace(channel).has_history:
            return ""
        with contextlib.suppress(HubError):
            return (await self.commands.node.history_page(channel, None, 0)).position.epoch
        return ""

    def _joined(
        self, command_id: int, request: cf.SubscribeRequest, since: p.Since | None,
        delta: bool, expires: int | None, rejected: list[bool],
    ) -> Callable[[Joined], None]:
        ttl = cf.token_ttl(expires, time.time()) if expires is not None else 0

        def reply(start: Joined) -> None:
            position = start.position
            if position is None:  # no history: nothing to recover, nothing to track
                result = cf.SubscribeResult(expires=expires is not None, ttl=ttl, delta=delta)
                self.answer(cf.Reply(id=command_id, subscribe=result))
                return
            recovered = bool(start.recovered)
            if request.recover and not recovered and request.flag & REJECT_UNRECOVERED:
                rejected.append(True)
                self.answer(cf.error_reply(command_id, cf.ErrorCode.UNRECOVERABLE_POSITION))
                return
            offset = since.offset if recovered and since is not None else position.offset
            result = cf.SubscribeResult(
                expires=expires is not None, ttl=ttl,
                recoverable=True, positioned=True, epoch=position.epoch, offset=offset,
                recovered=recovered, was_recovering=request.recover, delta=delta,
                publications=self._recovered(start.messages, delta),
            )
            self.answer(cf.Reply(id=command_id, subscribe=result))

        return reply

    def _recovered(self, messages: list[p.Message], delta: bool) -> list[cf.Publication]:
        """Recovered publications; for a delta subscription the first whole, each next
        one a patch against the one before (as Centrifugo recovers them)."""
        if not delta:
            return [publication(m) for m in messages]
        pubs: list[cf.Publication] = []
        before: p.Message | None = None
        for message in messages:
            patch = None
            if before is not None:
                patch = fossil_delta(bytes(before.data), bytes(message.data))
                if len(patch) >= len(message.data):
                    patch = None
            pubs.append(self.codec.delta_publication(message, patch))
            before = message
        return pubs

    async def _sub_refresh(self, command_id: int, request: cf.SubRefreshRequest) -> None:
        """A new subscription token for a channel: 109 expired, 103 invalid (Centrifugo
        closes the subscription on an invalid one; the SDK then stops it)."""
        try:
            identity = await self.commands.node.authenticator.verify_subscription(
                request.token, self.user, request.channel)
        except AuthFailed as exc:
            self.answer(cf.error_reply(command_id, _token_error(exc)))
            return
        expires, ttl = self._lifetime(identity)
        if expires and ttl < 1:
            self.answer(cf.error_reply(command_id, cf.ErrorCode.TOKEN_EXPIRED))
            return
        if identity.expires is not None:
            self._watch_subscription(request.channel, identity.expires)
        elif self.sub_expiries is not None:
            self.sub_expiries.pop(request.channel, None)
        result = cf.SubRefreshResult(expires=expires, ttl=ttl)
        self.answer(cf.Reply(id=command_id, sub_refresh=result))

    def _watch_subscription(self, channel: str, expires: int) -> None:
        """At its token's `exp` a subscription that was not refreshed ends with an
        unsubscribe push 2501 (the SDK subscribes again with a new token)."""
        if self.sub_expiries is None:
            self.sub_expiries = {}
        self.sub_expiries[channel] = expires
        delay = max(0.0, expires - time.time())
        asyncio.get_running_loop().call_later(delay, self._subscription_due, channel)

    def _subscription_due(self, channel: str) -> None:
        expiries = self.sub_expiries
        if expiries is None or self.close_code is not None:
            return
        expires = expiries.get(channel)
        if expires is None or expires > time.time():
            return  # refreshed meanwhile, or unsubscribed
        del expiries[channel]
        self.push(self.codec.push(cf.unsubscribe_push(channel, cf.UnsubscribeCode.EXPIRED)))
        self.commands.node.spawn(self._leave_quietly(channel))

    async def _leave_quietly(self, channel: str) -> None:
        with contextlib.suppress(HubError):
            await self.commands.unsubscribe(self, channel)

    async def _publish_personal(self, data: msgspec.Raw) -> None:
        """A publish to one's own `#user` (Centrifugo's personal channel, open to its user
        where the default namespace lets subscribers publish): on `@user`, which every
        connection of the user hears under both names."""
        if self.permissions.namespace(centrifugo_personal(self.user)).publish != "any":
            raise HubError(ErrorCode.FORBIDDEN, "publishing to the personal channel is off")
        await self.commands.node.publish(
            personal_channel(self.user), data, None, from_user=self.user,
            from_client=self.client_id, from_info=self.identity.info, source="client",
        )

    async def _history(self, request: cf.HistoryRequest) -> cf.HistoryResult | None:
        """Centrifugo's meanings: `limit` 0 is the position only, a negative one everything
        up to the cap; without `since` the oldest first (it reads the stream from its
        start), with `reverse` the newest first (with `since`: those before it); a `since`
        of another epoch is error 112 (None here)."""
        self.commands.check_read(self, request.channel, self._subscribed(request.channel))
        node = self.commands.node
        limit = HISTORY_LIMIT if request.limit < 0 else min(request.limit, HISTORY_LIMIT)
        since = request.since
        if since is not None and request.reverse:
            page = await node.history_page(request.channel, None, HISTORY_LIMIT)
            if since.epoch and since.epoch != page.position.epoch:
                return None
            before = [m for m in page.messages if (m.offset or 0) < since.offset]
            messages = before[::-1][:limit]
        else:
            after = p.Since(since.offset, since.epoch) if since is not None else None
            if after is None and not request.reverse and limit:
                after = p.Since(0, "")  # the oldest first: read from the stream's start
            if after is not None and not after.epoch:  # any epoch: the current one
                top = (await node.history_page(request.channel, None, 0)).position
                after = p.Since(after.offset, top.epoch)
            page = await node.history_page(request.channel, after, limit)
            if after is not None and after.epoch != page.position.epoch:
                return None
            messages = page.messages[::-1] if request.reverse else page.messages
        position = page.position
        return cf.HistoryResult([publication(m) for m in messages], position.epoch,
                                position.offset)

    async def _refresh(self, command_id: int, token: str) -> None:
        """As Centrifugo does: an expired token closes 3005 (the SDK reconnects, gets 109 and
        fetches a new one); an invalid one, or another user's, closes 3500."""
        authenticator = self.commands.node.authenticator
        try:
            identity = await authenticator.verify(token, anonymous=self.commands.settings.anonymous)
        except AuthFailed as exc:
            self.close(exc.code, str(exc))
            return
        if identity.user != self.user:
            self.close(CloseCode.UNAUTHORIZED, "token of another user")
            return
        expires, ttl = self._lifetime(identity)
        if expires and ttl < 1:
            self.close(CloseCode.TOKEN_EXPIRED, "token expired")
            return
        self.refreshed(identity)
        self.answer(cf.Reply(id=command_id, refresh=cf.RefreshResult(expires=expires, ttl=ttl)))

    # what the server API did (PROTOCOL §15, §16): pushes, as Centrifugo sends them

    def server_subscribed(self, command: p.ServerSubscribe) -> Callable[[Joined], None]:
        """A subscribe push (the position, as a subscribe reply gives it), then the
        recovered publications."""
        channel, since = command.channel, command.since
        data = command.data if len(command.data) else None

        def pushed(start: Joined) -> None:
            position = start.position
            push = cf.SubscribePush(data=data)
            if position is not None:
                recovered = since is not None and bool(start.recovered)
                push = cf.SubscribePush(
                    recoverable=True, positioned=True, epoch=position.epoch, data=data,
                    offset=since.offset if since is not None and recovered else position.offset,
                )
            codec = self.codec
            units = [codec.unit(cf.Push(channel=channel, subscribe=push))]
            units += [codec.unit(cf.Push(channel=channel, pub=publication(message)))
                      for message in start.messages]
            self.push(codec.frame(units), len(units))

        return pushed

    def server_unsubscribed(self, channel: str) -> None:
        push = cf.unsubscribe_push(channel, cf.UnsubscribeCode.SERVER)
        self.push(self.codec.push(push))

    def server_refreshed(self, identity: Identity) -> None:
        expires, ttl = self._lifetime(identity)
        refresh = cf.RefreshPush(expires=expires, ttl=ttl)
        self.push(self.codec.push(cf.Push(refresh=refresh)))

def _token_error(failure: AuthFailed) -> cf.ErrorCode:
    """A subscription token refused: expired 109 (the SDK fetches another), else 103."""
    if failure.code == CloseCode.TOKEN_EXPIRED:
        return cf.ErrorCode.TOKEN_EXPIRED
    return cf.ErrorCode.PERMISSION_DENIED

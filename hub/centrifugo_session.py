"""Centrifugo's client protocol v2 (JSON) on `/connection/websocket`, once connected
(PROTOCOL §11): newline-separated commands in a text frame, each answered by id, and what
channels carry as pushes. The same hub as `/ws`: the same commands (`hub.commands`), the
same subscriptions, limits and metrics; only the words differ. What the SDKs need of each
reply is in docs/centrifugo-notes.md; the frames are `hub.centrifugo_frames`.
"""

from __future__ import annotations

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
from hub.channels import personal_channel
from hub.commands import ClientCommands
from hub.errors import CloseCode, ErrorCode, HubError
from hub.hooks import HookRefused
from hub.node import HISTORY_LIMIT
from hub.session import Session
from hub.subscriptions import Joined
from hub.wire import Outbound, text_frame

log = logging.getLogger("hub.centrifugo")

PING_FRAME = text_frame(cf.PING)


def client_info(user: str, client: str | None, info: msgspec.Raw | None) -> cf.ClientInfo:
    """`conn_info` is the token's `info`."""
    conn_info = info if info is not None and len(info) else None
    return cf.ClientInfo(user=user, client=client or "", conn_info=conn_info)


def publication(message: p.Message) -> cf.Publication:
    """Client publishes carry their publisher (`info`); API ones do not."""
    info = None
    if message.from_ is not None:
        info = client_info(message.from_, message.client, message.info)
    return cf.message_publication(message, info)


class CentrifugoCodec:
    protocol = "centrifugo"

    def message(self, message: p.Message) -> bytes:
        push = cf.Push(channel=message.channel, pub=publication(message))
        return text_frame(cf.encode_push(push))

    def event(self, event: p.Join | p.Leave) -> bytes:
        info = client_info(event.user, event.client, event.info)
        if isinstance(event, p.Join):
            push = cf.Push(channel=event.channel, join=cf.Join(info=info))
        else:
            push = cf.Push(channel=event.channel, leave=cf.Leave(info=info))
        return text_frame(cf.encode_push(push))


CENTRIFUGO_CODEC = CentrifugoCodec()


class CentrifugoSession(Session):
    __slots__ = ("pong_due",)
    codec = CENTRIFUGO_CODEC

    def __init__(
        self, commands: ClientCommands, outbound: Outbound, client_id: str, identity: Identity
    ) -> None:
        super().__init__(commands, outbound, client_id, identity)
        self.pong_due = False  # pinged, and no `{}` back yet

    # outbound

    def answer(self, reply: cf.Reply) -> None:
        self.push(text_frame(cf.encode(reply)))

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
        self.push(text_frame(cf.encode_push(push)))

    def reset(self, channel: str, position: StreamPosition) -> bool:
        """The subscription ends here (it is dropped first), and the SDK subscribes again
        with its last position: `recovered: false` tells the app to reload (PROTOCOL §11)."""
        self.push(text_frame(cf.encode_push(cf.unsubscribe_push(channel))))
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
    ) -> None:
        """The connect reply: it comes first, and lists the personal channel (the SDKs
        drop pushes of channels they were not told of), and the connect hook's channels.
        A connection the connect hook let in is refreshed by the server (the refresh
        hook), so its SDK is told of no expiry."""
        by_hook = self.hook is not None and self.hook.hooked
        expires, ttl = (False, 0) if by_hook else self._lifetime(self.identity)
        ping = math.ceil(ping_interval) if ping_interval else 0
        subs = {personal_channel(self.user): cf.SubscribeResult()}
        subs.update((channel, cf.SubscribeResult()) for channel in channels)
        result = cf.ConnectResult(
            client=self.client_id, version=node_version, expires=expires, ttl=ttl,
            subs=subs, ping=ping, pong=bool(ping), data=data,
        )
        self.answer(cf.Reply(id=command_id, connect=result))

    @staticmethod
    def _lifetime(identity: Identity) -> tuple[bool, int]:
        if identity.expires is None:
            return False, 0
        return True, cf.token_ttl(identity.expires, time.time())

    # inbound

    async def handle(self, text: str) -> None:
        await self.handle_messages(cf.split_frame(text))

    async def handle_messages(self, messages: list[bytes]) -> None:
        """Commands in order: centrifuge-js sends `connect` and its subscribes in one frame."""
        for message in messages:
            if self.close_code is not None:
                return
            try:
                command = cf.decode_command(message)
            except cf.BadCommand as exc:
                self.commands.metrics.protocol_errors.count(decode_reason(message, exc))
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
            request = command.subscribe
            joined = self._joined(command_id, request)
            await commands.subscribe(self, request.channel, request.since, joined, request.data)
        elif method == "unsubscribe" and command.unsubscribe is not None:
            # Always a success: both SDKs reconnect on an unsubscribe error.
            with contextlib.suppress(HubError):
                await commands.unsubscribe(self, command.unsubscribe.channel)
            self.answer(cf.Reply(id=command_id, unsubscribe=cf.UnsubscribeResult()))
        elif method == "publish" and command.publish is not None:
            request_publish = command.publish
            await commands.publish(self, request_publish.channel, request_publish.data, None)
            self.answer(cf.Reply(id=command_id, publish=cf.PublishResult()))
        elif method == "presence" and command.presence is not None:
            members = await commands.presence(self, command.presence.channel)
            presence = {m.client: client_info(m.user, m.client, m.info) for m in members}
            self.answer(cf.Reply(id=command_id, presence=cf.PresenceResult(presence)))
        elif method == "presence_stats" and command.presence_stats is not None:
            members = await commands.presence(self, command.presence_stats.channel)
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
            self.answer(cf.Reply(id=command_id, rpc=cf.RpcResult(data=data)))
        elif method == "connect":
            self._protocol_error("bad_command")
            self.close(cf.DisconnectCode.BAD_REQUEST, "client already authenticated")
        else:
            self._protocol_error("unknown_command")
            self.fail(command_id, HubError(ErrorCode.UNKNOWN_TYPE, "method not found"))

    def _protocol_error(self, reason: str) -> None:
        self.commands.metrics.protocol_errors.count(reason)

    def _joined(
        self, command_id: int, request: cf.SubscribeRequest
    ) -> Callable[[Joined], None]:
        def reply(start: Joined) -> None:
            position = start.position
            if position is None:  # no history: nothing to recover, nothing to track
                self.answer(cf.Reply(id=command_id, subscribe=cf.SubscribeResult()))
                return
            recovered = bool(start.recovered)
            offset = request.offset if recovered else position.offset
            result = cf.SubscribeResult(
                recoverable=True, positioned=True, epoch=position.epoch, offset=offset,
                recovered=recovered, was_recovering=request.recover,
                publications=[publication(m) for m in start.messages],
            )
            self.answer(cf.Reply(id=command_id, subscribe=result))

        return reply

    async def _history(self, request: cf.HistoryRequest) -> cf.HistoryResult | None:
        """Centrifugo's meanings: `limit` 0 is the position only, a negative one everything
        up to the cap; `reverse` newest first (with `since`: those before it); a `since` of
        another epoch is error 112 (None here)."""
        self.commands.check_read(self, request.channel)
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
        try:
            identity = await self.commands.node.authenticator.verify(token)
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
            frames = [cf.encode_push(cf.Push(channel=channel, subscribe=push))]
            frames += [cf.encode_push(cf.Push(channel=channel, pub=publication(message)))
                       for message in start.messages]
            self.push(text_frame(cf.join_frame(frames)), len(frames))

        return pushed

    def server_unsubscribed(self, channel: str) -> None:
        push = cf.unsubscribe_push(channel, cf.UnsubscribeCode.SERVER)
        self.push(text_frame(cf.encode_push(push)))

    def server_refreshed(self, identity: Identity) -> None:
        expires, ttl = self._lifetime(identity)
        refresh = cf.RefreshPush(expires=expires, ttl=ttl)
        self.push(text_frame(cf.encode_push(cf.Push(refresh=refresh))))

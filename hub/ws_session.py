"""The hub's own protocol on `/ws` (PROTOCOL §3): one JSON command per text frame, replies
that echo its `id`, and the server frames of what channels carry."""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec

from hub import protocol as p
from hub.abuse import decode_reason
from hub.auth import Identity
from hub.broker import StreamPosition
from hub.errors import ErrorCode, HubError
from hub.session import Session
from hub.subscriptions import Joined
from hub.wire import frame_of, text_frame

log = logging.getLogger("hub.session")


class WsCodec:
    """`/ws` frames: the publishing connection and tokens' `info` stay off them."""

    protocol = "ws"

    def message(self, message: p.Message) -> bytes:
        return text_frame(p.encode(message.on_ws()))

    def event(self, event: p.Join | p.Leave) -> bytes:
        if event.info is not p.NO_RAW:
            event = msgspec.structs.replace(event, info=p.NO_RAW)
        return frame_of(event)


WS_CODEC = WsCodec()


class WsSession(Session):
    __slots__ = ()
    codec = WS_CODEC

    def reply(self, frame: msgspec.Struct) -> None:
        self.push(frame_of(frame))

    def error(self, code: ErrorCode, message: str, frame_id: int | None) -> None:
        self.count_error(code)
        self.reply(p.Error(code=code.value, message=message, id=frame_id))

    def reset(self, channel: str, position: StreamPosition) -> bool:
        self.reply(p.Reset(channel=channel, epoch=position.epoch, offset=position.offset))
        return True

    def hook_subscribed(self, channel: str) -> Callable[[Joined], None]:
        """A subscription the connect hook gave: `subscribed` without an id."""
        return self._joined(channel, None)

    def subscription_expired(self, channel: str) -> None:
        self.reply(p.Unsubscribed(channel=channel))

    async def handle(self, text: str) -> None:
        if not self.allow():
            if self.close_code is None:
                self.error(ErrorCode.RATE_LIMITED, "too many commands, slow down",
                           p.frame_id_of(text))
            return
        frame_id: int | None = None
        try:
            command = p.decode_command(text)
            frame_id = command.id
            await self.dispatch(command)
        except p.BadFrame as exc:
            self.commands.metrics.protocol_errors.count(decode_reason(text, exc))
            self.error(exc.code, exc.message, exc.frame_id)
        except HubError as exc:
            self.error(exc.code, exc.message, frame_id)
        except Exception:
            log.exception("command failed", extra={"client": self.client_id, "user": self.user})
            self.error(ErrorCode.INTERNAL, "internal error", frame_id)

    async def dispatch(self, command: p.Command) -> None:
        commands = self.commands
        match command:
            case p.Subscribe(id=frame_id, channel=channel, since=since):
                await commands.subscribe(self, channel, since, self._joined(channel, frame_id))
            case p.Unsubscribe(id=frame_id, channel=channel):
                await commands.unsubscribe(self, channel)
                self.reply(p.Unsubscribed(channel=channel, id=frame_id))
            case p.Publish(id=frame_id, channel=channel, data=data, event=event):
                position = await commands.publish(self, channel, data, event)
                self.reply(p.Published(
                    channel=channel, id=frame_id,
                    offset=position.offset if position else None,
                    epoch=position.epoch if position else None,
                ))
            case p.PresenceRequest(id=frame_id, channel=channel):
                clients = await commands.presence(self, channel)
                self.reply(p.PresenceReply(channel=channel, clients=clients, id=frame_id))
            case p.HistoryRequest(id=frame_id, channel=channel, since=since, limit=limit):
                reply = await commands.history(self, channel, since, limit)
                reply.id = frame_id
                self.reply(reply)
            case p.Refresh(id=frame_id, token=token):
                identity = await commands.refresh(self, token)
                self.refreshed(identity)
                self.reply(p.Refreshed(expires=identity.expires, id=frame_id))
            case p.Ping(id=frame_id):
                self.reply(p.Pong(id=frame_id))
            case p.Rpc(id=frame_id, method=method, data=data):
                result = await commands.rpc(self, method, data)
                self.reply(p.RpcReply(id=frame_id, data=result))
            case p.Auth(id=frame_id):
                raise HubError(ErrorCode.BAD_REQUEST, "already authenticated; use refresh")

    # what the server API did (PROTOCOL §15): the replies' frames, without an id

    def server_subscribed(self, command: p.ServerSubscribe) -> Callable[[Joined], None]:
        return self._joined(command.channel, None)

    def server_unsubscribed(self, channel: str) -> None:
        self.reply(p.Unsubscribed(channel=channel))

    def server_refreshed(self, identity: Identity) -> None:
        self.reply(p.Refreshed(expires=identity.expires))

    def _joined(self, channel: str, frame_id: int | None) -> Callable[[Joined], None]:
        """The `subscribed` reply, then the recovered messages."""

        def reply(start: Joined) -> None:
            position = start.position
            self.reply(p.Subscribed(
                channel=channel, id=frame_id,
                offset=position.offset if position else None,
                epoch=position.epoch if position else None,
                recovered=start.recovered,
            ))
            for message in start.messages:
                self.push(self.codec.message(message))

        return reply

"""`POST /api/subscribe` and `POST /api/unsubscribe` (PROTOCOL §9, §15): the backend moves
a user's connections into or out of a channel, on whichever node they are.

The call is relayed on the user's personal channel, as `/api/disconnect` is, so it reaches
every node with a connection of the user; each connection is told in its own protocol
(`hub.session.Session.server_command`). The reply means "handed to the broker", not "done
on every connection": a connection that is over its subscription limit, say, is skipped
and logged there.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from hub import api_types as t
from hub import protocol as p
from hub.channels import check_name
from hub.endpoints import _body, _check_user, api
from hub.node import Node


@api
async def subscribe(request: Request, node: Node) -> t.Empty:
    body = await _body(request, t.SubscribeBody)
    _check_user(body.user)
    since = p.Since(body.since.offset, body.since.epoch) if body.since is not None else None
    await node.subscribe_user(body.user, body.channel, since, client=body.client)
    return t.Empty()


@api
async def unsubscribe(request: Request, node: Node) -> t.Empty:
    body = await _body(request, t.UnsubscribeBody)
    _check_user(body.user)
    check_name(body.channel)  # here an empty one is no channel, not every channel
    await node.unsubscribe_user(body.user, body.channel, client=body.client)
    return t.Empty()


routes = [
    Route("/api/subscribe", subscribe, methods=["POST"]),
    Route("/api/unsubscribe", unsubscribe, methods=["POST"]),
]

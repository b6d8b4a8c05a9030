"""The hub inside a Starlette application: mounted under /realtime, started and stopped by
the application's own lifespan, and published to in-process (no HTTP round trip).

    python examples/embedded_app.py [--port 8000]

Then connect a WebSocket client to ws://127.0.0.1:8000/realtime/ws?user=alice (dev mode:
no token), send {"type":"subscribe","channel":"orders"}, and place an order:

    curl -s -X POST http://127.0.0.1:8000/orders -d '{"item": "tea", "user": "alice"}'

Every subscriber of `orders` gets the order, and alice alone gets a receipt on her personal
channel. The hub's own pages move with the mount: /realtime/admin, /realtime/openapi.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hub.embed import EmbeddedHub
from hub.errors import HubError
from hub.settings import load_settings


def build_app() -> Starlette:
    # Dev mode: clients connect without a token (loopback only). Outside dev mode set
    # HUB_JWT_SECRET (or a public key) and HUB_API_KEY, as for `hub serve`: load_settings
    # reads every HUB_* variable.
    realtime = EmbeddedHub(load_settings({"dev": True}))
    order_numbers = itertools.count(1)

    async def place_order(request: Request) -> JSONResponse:
        order = await request.json()
        number = next(order_numbers)
        try:
            await realtime.publish("orders", {"number": number, "item": order.get("item")},
                                   event="order")
            if order.get("user"):
                await realtime.send(str(order["user"]), {"receipt": number}, event="receipt")
        except HubError as exc:  # e.g. `unavailable` while the broker is down
            return JSONResponse({"error": exc.code, "message": exc.message}, 503)
        return JSONResponse({"number": number})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The application's own start-up and shutdown go around the hub's.
        async with realtime.running():
            yield

    return Starlette(
        routes=[Route("/orders", place_order, methods=["POST"]), realtime.mount("/realtime")],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(build_app(), host="127.0.0.1", port=args.port, ws="websockets-sansio",
                log_level="info")


if __name__ == "__main__":
    main()

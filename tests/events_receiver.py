"""An application's events endpoint for tests (PROTOCOL §14), run in its own process:
`python -m tests.events_receiver PORT SECRET`.

- `POST /events`: a batch. Its signature is checked with `hub.hooks.verify_signature`
  (a bad one is counted and answered 401); a good one is recorded whole, in arrival order,
  then answered with the current status (`/mode`), after the current delay.
- `POST /mode {"status": 500, "delay": 0}`: how later batches are answered (status other
  than 2xx: the batch is counted as an attempt but its events are not recorded).
- `GET /events`: `{"events": [...], "attempts": n, "bad_signatures": n}`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hub.hooks import SIGNATURE_HEADER, verify_signature


def create_receiver(secret: str) -> Starlette:
    state: dict[str, Any] = {"status": 200, "delay": 0.0, "attempts": 0, "bad": 0}
    events: list[dict[str, Any]] = []

    async def receive(request: Request) -> Response:
        body = await request.body()
        state["attempts"] += 1
        if not verify_signature(body, request.headers.get(SIGNATURE_HEADER), secret):
            state["bad"] += 1
            return Response(status_code=401)
        if state["delay"]:
            await asyncio.sleep(state["delay"])
        status = state["status"]
        if 200 <= status < 300:
            events.extend(json.loads(body)["events"])
        return Response(status_code=status)

    async def mode(request: Request) -> Response:
        state.update(await request.json())
        return JSONResponse({})

    async def recorded(request: Request) -> Response:
        return JSONResponse(
            {"events": events, "attempts": state["attempts"], "bad_signatures": state["bad"]})

    return Starlette(routes=[
        Route("/events", receive, methods=["POST"]),
        Route("/mode", mode, methods=["POST"]),
        Route("/events", recorded, methods=["GET"]),
    ])


def main() -> None:
    port, secret = int(sys.argv[1]), sys.argv[2]
    print(f"receiver on {port}", flush=True)
    uvicorn.run(create_receiver(secret), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()

"""`GET /openapi.json` (PROTOCOL §1): a valid OpenAPI 3.1 document of every HTTP API call,
built from the Structs the endpoints encode, served without a key; and schemathesis
against a live node with the API key.

Schemathesis runs with `--checks all` and finds nothing. What it found on the way, all
fixed in the hub or in the document:
- `since` without `epoch` is refused (400): the document now says `since` needs `epoch`
  (one exploded query object with `dependentRequired`).
- `code: 3388.0` in /api/disconnect: a JSON Schema integer includes 3388.0; the endpoint
  now takes an integral float as the integer.
- a personal channel `@<user>` whose user id holds a line break answered 404 on
  /api/presence and /api/history (Starlette's `{path}` stops at `\\n`): those routes match
  any character now.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
from openapi_spec_validator import validate
from starlette.routing import Route

from hub import api_types, centrifugo_api
from hub.app import create_app
from tests.support import API_KEY, WAIT, RunningNode, make_settings, running_node

API_CALLS = {
    ("post", "/api/publish"), ("post", "/api/broadcast"), ("post", "/api/send"),
    ("post", "/api/batch"), ("post", "/api/disconnect"), ("get", "/api/presence/{channel}"),
    ("get", "/api/history/{channel}"), ("get", "/api/channels"), ("get", "/api/stats"),
    ("get", "/api/connections"), ("delete", "/api/history/{channel}"),
    ("get", "/api/namespaces"),
    ("post", "/api/subscribe"), ("post", "/api/unsubscribe"),
}
PROBES = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}
CENTRIFUGO_CALLS = {("post", f"/centrifugo/api/{name}") for name in centrifugo_api.METHOD_NAMES}
# Every namespace open, with history and presence, so most generated calls can succeed.
OPEN_NAMESPACES = {"default": {"subscribe": "any", "publish": "any", "history_size": 100,
                               "history_ttl": 300, "presence": True}}
SCHEMATHESIS_EXAMPLES = os.environ.get("HUB_SCHEMATHESIS_EXAMPLES", "40")
SCHEMATHESIS_SEED = os.environ.get("HUB_SCHEMATHESIS_SEED", "1")


async def fetch_document(node: RunningNode) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=node.url, timeout=WAIT) as bare:
        response = await bare.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item}


async def test_document_is_valid_openapi_31_and_served_without_a_key(
    node: RunningNode,
) -> None:
    document = await fetch_document(node)
    validate(document)
    assert document["openapi"] == "3.1.0"
    assert operations(document) == API_CALLS | PROBES | CENTRIFUGO_CALLS


async def test_document_covers_every_http_route_of_the_app() -> None:
    """A route added to the app without a place in the document fails here."""
    app = create_app(make_settings())
    served = {
        (method.lower(), re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path))
        for route in app.routes if isinstance(route, Route)
        for method in (route.methods or ()) if method != "HEAD"
    }
    not_api = {("get", "/openapi.json"), ("get", "/admin"), ("get", "/admin/{name}"),
               ("get", "/admin/config.json"),
               ("get", "/")}
    assert served - not_api == API_CALLS | PROBES


async def test_schemas_are_those_of_the_structs(node: RunningNode) -> None:
    document = await fetch_document(node)
    _, expected = msgspec.json.schema_components(
        (*api_types.BODIES, *api_types.REPLIES), ref_template="#/components/schemas/{name}"
    )
    expected |= centrifugo_api.openapi_schemas()
    # as JSON carries them (a tuple default is a list there)
    assert document["components"]["schemas"] == msgspec.json.decode(msgspec.json.encode(expected))
    publish = document["paths"]["/api/publish"]["post"]
    body_schema = publish["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/PublishBody"}
    ok = publish["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/PublishReply"}


async def test_every_api_call_names_its_errors_and_auth(node: RunningNode) -> None:
    document = await fetch_document(node)
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": "HUB_API_KEY"}
    assert schemes["Bearer"]["type"] == "http" and schemes["Bearer"]["scheme"] == "bearer"
    error_ref = {"$ref": "#/components/schemas/ErrorReply"}
    for method, path in API_CALLS:
        operation = document["paths"][path][method]
        assert operation["security"] == [{"ApiKey": []}, {"Bearer": []}]
        responses = operation["responses"]
        expected = {"200", "401", "403", "500", "503"}
        if method == "post":
            expected |= {"400", "413"}
        if path.endswith("{channel}"):
            expected |= {"400"}
        assert expected <= set(responses), (path, sorted(responses))
        for status in expected - {"200"}:
            assert responses[status]["content"]["application/json"]["schema"] == error_ref
    publish = document["paths"]["/api/publish"]["post"]["responses"]
    assert "invalid_channel" in publish["400"]["description"]
    assert "unavailable" in publish["503"]["description"]
    for method, path in PROBES:
        assert document["paths"][path][method]["security"] == []
    error_codes = document["components"]["schemas"]["ErrorDetail"]["properties"]["code"]
    assert {"bad_request", "invalid_channel", "unauthorized", "forbidden",
            "unavailable"} <= set(error_codes["enum"])


async def test_replies_decode_into_the_documented_structs(node: RunningNode) -> None:
    """What the live endpoints answer is what the Structs (and so the schemas) say."""
    http = node.http
    replies: list[tuple[httpx.Response, type[msgspec.Struct]]] = [
        (await http.post("/api/publish", json={"channel": "feed:a", "data": 1}),
         api_types.PublishReply),
        (await http.post("/api/broadcast", json={"channels": ["x", "bad name"], "data": 1}),
         api_types.BroadcastReply),
        (await http.post("/api/send", json={"user": "u", "data": 1}), api_types.Empty),
        (await http.get("/api/history/feed:a"), api_types.HistoryReply),
        (await http.get("/api/presence/chat:a"), api_types.PresenceReply),
        (await http.get("/api/channels"), api_types.ChannelsReply),
        (await http.get("/api/stats"), api_types.StatsReply),
        (await http.get("/healthz"), api_types.HealthReply),
        (await http.get("/readyz"), api_types.ReadyReply),
        (await http.get("/api/presence/room"), api_types.ErrorReply),
    ]
    for response, kind in replies:
        msgspec.json.decode(response.content, type=kind)


def schemathesis_command(node: RunningNode, report: Path) -> list[str]:
    executable = Path(sys.executable).with_name("schemathesis")
    return [
        str(executable), "run", f"{node.url}/openapi.json", "--url", node.url,
        "--header", f"X-API-Key: {API_KEY}",
        "--checks", "all",
        "--max-examples", SCHEMATHESIS_EXAMPLES, "--seed", SCHEMATHESIS_SEED,
        "--request-timeout", "5", "--max-failures", "20",
        "--report", "junit", "--report-junit-path", str(report),
    ]


async def test_schemathesis_finds_nothing_against_a_live_node(tmp_path: Path) -> None:
    async with running_node(make_settings(namespaces=OPEN_NAMESPACES)) as node:
        process = await asyncio.create_subprocess_exec(
            *schemathesis_command(node, tmp_path / "junit.xml"), cwd=tmp_path,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "120"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 100)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    text = output.decode(errors="replace")
    summary = re.search(r"(\d+) generated, (.*)", text)
    print(summary.group(0) if summary else "no summary")  # shown with pytest -s
    assert process.returncode == 0, text[-6000:]
    assert summary is not None and "passed" in summary.group(2), text[-3000:]
    assert int(summary.group(1)) > 300, summary.group(0)  # it did test something

"""docs/guide.md's recipes, run: a token minted from an application's login
(examples/tokens.py) admits a connection to exactly what it names; the FastAPI and the Django
recipes and protocol.md §13's Django connect hook, their code blocks read from the docs and
executed as printed (the test gives them what they leave to the application: a user, a login,
settings), against a real node; the consumer service (examples/consumer.py, on `hub.client`)
prints what is published. And every shell line of the guide and of operations.md is checked:
each `hub ...` parses with hub's own parser, each `python examples/...` names a file whose
parser takes the flags shown, each `helm ... --set` names a key of the chart's values."""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import itertools
import json
import os
import re
import runpy
import shlex
import sys
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
import yaml

from hub.api import HubClient
from hub.cli import build_parser
from hub.client import CommandError, Message, connect
from tests.support import (
    API_KEY,
    SECRET,
    WAIT,
    RunningNode,
    eventually,
    make_settings,
    publish,
    running_node,
    started,
)

REPO = Path(__file__).resolve().parents[1]
hub_token = runpy.run_path(str(REPO / "examples" / "tokens.py"))["hub_token"]


async def test_a_token_from_the_applications_login(node: RunningNode) -> None:
    token = hub_token("alice", secret=SECRET, channels=["feed:*"], publish=["chat:*"],
                      info={"name": "Alice"})
    async with connect(node.ws_url, token=token) as client:
        assert client.user == "alice" and client.expires is not None
        feed = await client.subscribe("feed:prices")
        await publish(node, "feed:prices", 42)
        item = await asyncio.wait_for(feed.__anext__(), WAIT)
        assert isinstance(item, Message) and item.data == 42
        with pytest.raises(CommandError) as refused:
            await client.publish("feed:prices", 1)
        assert refused.value.code == "forbidden"


async def test_the_consumer_service_prints_what_is_published() -> None:
    async with running_node(make_settings(dev=True, api_key=None)) as node:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "examples" / "consumer.py"),
            "--url", node.ws_url + "?user=consumer", "--channel", "news", "--count", "2",
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert process.stdout is not None
        try:
            ready = json.loads(await asyncio.wait_for(process.stdout.readline(), 3 * WAIT))
            assert ready == {"ready": "test-node"}
            for text in ("one", "two"):
                await publish(node, "news", {"text": text})
            lines = [json.loads(await asyncio.wait_for(process.stdout.readline(), WAIT))
                     for _ in range(2)]
            assert [line["data"]["text"] for line in lines] == ["one", "two"]
            assert await asyncio.wait_for(process.wait(), WAIT) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


class Handled(Exception):
    pass


async def test_the_heart_of_the_consumer_as_the_guide_prints_it() -> None:
    """The guide's `hub.client` block (top-level `async with`), run with what it leaves to
    the service: `urls`, `token`, `handle` (here: stop after two) and `reload_state`."""
    handled: list[Any] = []
    resets: list[str] = []

    def handle(data: Any) -> None:
        handled.append(data)
        if len(handled) == 2:
            raise Handled

    code = compile(code_block("guide.md", "The heart of it:"), "guide_consumer", "exec",
                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    async with running_node(make_settings(namespaces=RECIPE_NAMESPACES)) as node:
        given = {"urls": [node.ws_url], "handle": handle,
                 "token": hub_token("billing", secret=SECRET, channels=["orders:*"]),
                 "reload_state": lambda: resets.append("reset")}
        running = asyncio.ensure_future(eval(code, given))
        async with HubClient(node.url, api_key=API_KEY) as api:
            await eventually(lambda: api.channels("orders:"),
                             lambda reply: "orders:eu" in reply.channels, within=WAIT,
                             what="the consumer subscribed")
            for n in (1, 2):
                await api.publish("orders:eu", {"n": n})
        with pytest.raises(Handled):
            await asyncio.wait_for(running, WAIT)
    assert handled == [{"n": 1}, {"n": 2}] and resets == []


def anchors_of(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but `-` and `_` dropped, spaces
    to `-`."""
    found = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_link_of_the_guide_leads_somewhere() -> None:
    guide = REPO / "docs" / "guide.md"
    links = re.findall(r"\]\(([^)]+)\)", guide.read_text())
    assert len(links) > 10
    for link in links:
        path, _, anchor = link.partition("#")
        target = (guide.parent / path).resolve() if path else guide
        assert target.exists(), link
        if anchor:
            assert anchor in anchors_of(target.read_text()), link


# The recipes' code, as the docs print it

RECIPE_NAMESPACES = {
    "default": {"subscribe": "token", "publish": "none", "history_size": 10,
                "history_ttl": 60},
    "orders": {"subscribe": "token", "publish": "none", "history_size": 10, "history_ttl": 60},
    "notifications": {"subscribe": "token", "publish": "none"},
}
HOOK_SECRET = "hook-secret-for-the-guide"


def code_block(doc: str, after: str) -> str:
    """The first ```python block of docs/`doc` after the line that starts with `after`."""
    text = (REPO / "docs" / doc).read_text()
    start = text.index("\n" + after)
    found = re.compile(r"^```python\n(.*?)^```$", re.S | re.M).search(text, start)
    assert found, f"no python block after {after!r} in {doc}"
    return found.group(1)


def run_block(code: str, name: str, **given: Any) -> dict[str, Any]:
    """`code` run as a module of its own whose globals start as `given` (what the recipe
    leaves to the application); `examples/` is importable, as the recipes' comments say."""
    namespace: dict[str, Any] = {"__name__": name, **given}
    sys.path.insert(0, str(REPO / "examples"))
    try:
        exec(compile(code, name, "exec"), namespace)
    finally:
        sys.path.remove(str(REPO / "examples"))
    return namespace


async def next_item(subscription: Any) -> Any:
    return await asyncio.wait_for(subscription.__anext__(), WAIT)


async def test_the_fastapi_recipe() -> None:
    from fastapi import Header, HTTPException
    from pydantic import BaseModel

    class User(BaseModel):
        id: str

    class Order(BaseModel):
        item: str
        quantity: int

    def current_user(x_user: str | None = Header(default=None)) -> User:
        if not x_user:  # the application's login; here a header says who it is
            raise HTTPException(401)
        return User(id=x_user)

    async with running_node(make_settings(namespaces=RECIPE_NAMESPACES)) as node:
        recipe = run_block(
            code_block("guide.md", "### A FastAPI backend"), "guide_fastapi", User=User,
            Order=Order, current_user=current_user, HUB_URL=node.url, HUB_API_KEY=API_KEY,
            HUB_JWT_SECRET=SECRET,
        )
        transport = httpx.ASGITransport(app=recipe["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as app:
            assert (await app.get("/hub-token")).status_code == 401
            reply = await app.get("/hub-token", headers={"X-User": "alice"})
            assert reply.status_code == 200
            async with connect(node.ws_url, token=reply.json()["token"]) as client:
                assert client.user == "alice"
                orders = await client.subscribe("orders:alice")
                with pytest.raises(CommandError) as refused:
                    await client.subscribe("orders:bob")
                assert refused.value.code == "forbidden"
                placed = await app.post("/orders", headers={"X-User": "alice"},
                                        json={"item": "tea", "quantity": 2})
                assert placed.status_code == 200 and placed.json() == {"offset": 1}
                item = await next_item(orders)
                assert isinstance(item, Message)
                assert (item.data, item.event, item.offset) == (
                    {"item": "tea", "quantity": 2}, "placed", 1)
        await recipe["hub"].aclose()


@pytest.fixture(scope="module")
def django_site(tmp_path_factory: pytest.TempPathFactory) -> types.ModuleType:
    """Django configured once for this process (a settings module of the test's own: the
    recipes' settings, sessions and auth on an SQLite file); the recipes' views are routed
    by putting them in the returned urlconf's `urlpatterns`."""
    import django
    from django.conf import settings
    from django.core.management import call_command

    urlconf = types.ModuleType("guide_urls")
    urlconf.urlpatterns = []  # type: ignore[attr-defined]
    settings.configure(
        SECRET_KEY="guide-test-" + "k" * 50, ROOT_URLCONF=urlconf, ALLOWED_HOSTS=["*"],
        USE_TZ=True, DEBUG=False,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth",
                        "django.contrib.sessions"],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                    "django.contrib.auth.middleware.AuthenticationMiddleware"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": str(tmp_path_factory.mktemp("django") / "db.sqlite3")}},
        HUB_URL="", HUB_API_KEY=API_KEY, HUB_JWT_SECRET=SECRET, HUB_HOOK_SECRET=HOOK_SECRET,
    )
    django.setup()
    call_command("migrate", verbosity=0)
    return urlconf


def route(site: types.ModuleType, **views: Any) -> None:
    from django.urls import clear_url_caches, path

    site.urlpatterns[:] = [path(name, view) for name, view in views.items()]
    clear_url_caches()


async def logged_in(username: str) -> tuple[Any, Any]:
    """A user of Django's auth and a test client logged in as it."""
    from asgiref.sync import sync_to_async
    from django.contrib.auth.models import User
    from django.test import AsyncClient

    user = await sync_to_async(User.objects.create_user)(username, password="unused-here")
    client = AsyncClient()
    await client.aforce_login(user)
    return user, client


async def test_the_django_recipe(django_site: types.ModuleType) -> None:
    from django.conf import settings
    from django.test import AsyncClient

    async with running_node(make_settings(namespaces=RECIPE_NAMESPACES)) as node:
        settings.HUB_URL = node.url
        recipe = run_block(code_block("guide.md", "### A Django backend"), "guide_django")
        route(django_site, **{"hub-token": recipe["hub_token_view"],
                              "announce": recipe["announce"]})
        anonymous = AsyncClient()
        assert (await anonymous.get("/hub-token")).status_code == 302  # to the login page
        assert (await anonymous.post("/announce", {"title": "x"})).status_code == 302
        user, browser = await logged_in("dora")
        reply = await browser.get("/hub-token")
        assert reply.status_code == 200
        async with connect(node.ws_url, token=reply.json()["token"]) as client:
            assert client.user == str(user.pk)
            news = await client.subscribe("news")
            await client.subscribe(f"notifications:{user.pk}")
            with pytest.raises(CommandError) as refused:
                await client.subscribe(f"notifications:{user.pk + 1}")
            assert refused.value.code == "forbidden"
            assert (await browser.get("/announce")).status_code == 405
            announced = await browser.post("/announce", {"title": "Hello"})
            assert announced.status_code == 200 and announced.json() == {"offset": 1}
            item = await next_item(news)
            assert isinstance(item, Message) and item.data == {"title": "Hello"}
        await recipe["hub"].aclose()


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """`app` (ASGI) served by uvicorn in this event loop on a free loopback port."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        await started(server, task)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, WAIT)


async def test_the_django_connect_hook_of_protocol_13(django_site: types.ModuleType) -> None:
    from django.core.handlers.asgi import ASGIHandler
    from django.test import AsyncClient

    recipe = run_block(code_block("protocol.md", "**Django.**"), "protocol_django_hook")
    route(django_site, **{"hub/connect": recipe["hub_connect"]})
    secret = {"X-Hook-Secret": HOOK_SECRET}
    anonymous = AsyncClient()
    assert (await anonymous.post("/hub/connect", {}, headers=secret)).json() == {
        "error": {"code": 101, "message": "sign in first"}}
    assert (await anonymous.post("/hub/connect", {})).status_code == 403  # not the hub
    assert (await anonymous.get("/hub/connect", headers=secret)).status_code == 405
    user, browser = await logged_in("erin")
    cookie = f"sessionid={browser.cookies['sessionid'].value}"
    async with serving(ASGIHandler()) as app_url:
        settings = make_settings(
            hook_connect_url=app_url + "/hub/connect", hook_headers="Cookie",
            hook_static_headers=json.dumps({"X-Hook-Secret": HOOK_SECRET}),
            allowed_origins=app_url, namespaces=RECIPE_NAMESPACES,
        )
        async with running_node(settings) as node:
            connection = await websockets.connect(
                node.ws_url, origin=app_url,  # type: ignore[arg-type]
                additional_headers={"Cookie": cookie}, open_timeout=WAIT)
            try:
                welcome = json.loads(await asyncio.wait_for(connection.recv(), WAIT))
                assert welcome["type"] == "welcome" and welcome["user"] == str(user.pk)
            finally:
                await connection.close()


# The shell lines of the docs

SHELL_DOCS = {"guide.md": {"hub", "python"}, "operations.md": {"helm"}}  # what each runs


def shell_lines(doc: str) -> Iterator[str]:
    """The lines of the indented code blocks (outside fenced ones) of docs/`doc` that are
    shell, continuations joined, and its inline `hub ...` commands of more than a
    subcommand."""
    text = (REPO / "docs" / doc).read_text()
    fenced, in_block, previous, blocks = False, False, "", []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        in_block = (not fenced and line.startswith("    ")
                    and (in_block or not previous.strip()))
        blocks.append(line[4:] if in_block else "")
        previous = line
    for command in "\n".join(blocks).replace("\\\n", " ").split("\n"):
        if command and not command.startswith(("t=", " ")):  # not operations.md's timeline
            yield command
    for span in re.findall(r"`(hub [^`]+)`", text):
        if len(span.split()) > 2:
            yield span


def commands_of(line: str) -> Iterator[list[str]]:
    """The commands a shell line runs as argv, `$(...)` ones included, with leading
    `VAR=value` assignments dropped."""
    inner = re.findall(r"\$\(([^()]*)\)", line)
    for command in inner:
        yield from commands_of(command)
    outer = re.sub(r"\$\(([^()]*)\)", "SUBSTITUTED", line)
    for part in re.split(r"&&|\|\||;|\|", outer):
        argv = shlex.split(part)
        while argv and re.fullmatch(r"[A-Z_]+=.*", argv[0]):
            argv.pop(0)
        if argv:
            yield argv


class Parsed(Exception):
    pass


def example_accepts(path: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the example as `__main__` until its parser has parsed `args` (an error there
    exits 2 and fails), then stops it."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *a: Any, **k: Any) -> Any:
        real(self, *a, **k)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    with pytest.raises(Parsed):
        runpy.run_path(str(path), run_name="__main__")


def helm_values_have(keys: list[str]) -> None:
    """Each `--set` key names a value of helm/hub/values.yaml (`a.b[0].c`: an index into a
    list goes to that item, or to the first as the shape of the rest)."""
    values = yaml.safe_load((REPO / "helm" / "hub" / "values.yaml").read_text())
    for key in keys:
        node: Any = values
        for part in re.findall(r"\[\d+\]|[^.\[\]]+", key):
            if part.startswith("["):
                assert isinstance(node, list) and node, f"--set {key}: no list before {part}"
                node = node[min(int(part[1:-1]), len(node) - 1)]
            else:
                assert isinstance(node, dict) and part in node, f"--set {key}: no {part!r}"
                node = node[part]


@pytest.mark.parametrize("doc", SHELL_DOCS)
def test_every_shell_command_of_the_docs_is_understood(
    doc: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[str] = []
    for line in shell_lines(doc):
        for argv in commands_of(line):
            program = argv[0]
            if program == "hub":
                build_parser().parse_args(argv[1:])  # exits 2 on what it does not take
            elif program == "python" and argv[1].startswith("examples/"):
                assert (REPO / argv[1]).is_file(), argv[1]
                with monkeypatch.context() as patch:
                    example_accepts(REPO / argv[1], argv[2:], patch)
            elif program == "python" and argv[1:3] == ["-m", "benchmarks"]:
                continue  # tests/test_benchmarks.py parses these
            elif program == "helm":
                assert argv[1:4] == ["upgrade", "--install", "hub"] and (REPO / argv[4]).is_dir()
                helm_values_have([value.split("=", 1)[0] for flag, value
                                  in itertools.pairwise(argv) if flag == "--set"])
            elif program in {"kubectl", "openssl", "SUBSTITUTED"}:
                continue  # Kubernetes' and OpenSSL's own
            else:
                raise AssertionError(f"{doc}: a command this test does not know: {argv}")
            checked.append(program)
    assert set(checked) >= SHELL_DOCS[doc], f"{doc}: is this test still reading its commands?"

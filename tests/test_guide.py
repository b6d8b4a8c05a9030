"""docs/guide.md's recipes, run: a token minted from an application's login
(examples/tokens.py) admits a connection to exactly what it names, and the consumer service
(examples/consumer.py, on `hub.client`) prints what is published, as the guide says."""

from __future__ import annotations

import asyncio
import json
import os
import re
import runpy
import sys
from pathlib import Path

import pytest

from hub.client import CommandError, Message, connect
from tests.support import SECRET, WAIT, RunningNode, make_settings, publish, running_node

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

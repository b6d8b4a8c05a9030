"""The README's quick start, for real, in a fresh venv that has the runtime dependencies
only (no test extras): so a dependency that the package needs but does not declare fails
here, as it would for a new user.

The commands are read from README.md, not copied: `hub serve --dev` (with `--port 0`
added), the `python -m websockets` client as `?user=alice` typing the subscribe frame, and
`hub publish` (with `--url` added); then SIGTERM, and the node exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import WAIT

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
LISTENING = re.compile(rb"hub listening on (http://127\.0\.0\.1:\d+)")
INSTALL_SECONDS = 300


@dataclass
class Venv:
    path: Path
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.path / "bin" / name)


def readme_command(start: str) -> list[str]:
    """The README's shell line whose last command starts with `start`, as argv (what
    comes after `. .venv/bin/activate && ` is what runs in the venv)."""
    for line in README.splitlines():
        command = line.strip().rsplit("&& ", 1)[-1]
        if command.startswith(start):
            return shlex.split(command)
    raise AssertionError(f"no README command starts with {start!r}")


def readme_subscribe_frame() -> str:
    found = re.search(r'`(\{"type":"subscribe","channel":"news"\})`', README)
    assert found, "the README no longer tells the reader to subscribe to news"
    return found.group(1)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """`pip install .` of the package as a wheel carries it (pyproject, README, hub/ only:
    what the Docker build context has), without the test extras."""
    root = tmp_path_factory.mktemp("quickstart")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run(["cp", "-r", str(REPO / "hub"), str(source / "hub")], check=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HUB_") and k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    path = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=60, env=env)
    result = subprocess.run(
        [str(path / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
         str(source)],
        cwd=root, env=env, capture_output=True, text=True, timeout=INSTALL_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    env = {**env, "VIRTUAL_ENV": str(path), "PATH": f"{path / 'bin'}:{env.get('PATH', '')}"}
    yield Venv(path, env)


@contextlib.asynccontextmanager
async def process(
    venv: Venv, argv: list[str], *, stdin: int | None = None, stdout: int | None = None,
    stderr: int | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`argv` run from the venv's bin/ (as with the venv activated); killed if left running."""
    started = await asyncio.create_subprocess_exec(
        venv.bin(argv[0]), *argv[1:], env=venv.env, cwd=venv.path, stdin=stdin,
        stdout=stdout, stderr=stderr,
    )
    try:
        yield started
    finally:
        if started.returncode is None:
            started.kill()
            await started.wait()


async def read_until(stream: asyncio.StreamReader, needle: bytes) -> bytes:
    """What `stream` gives until `needle` appears in it (bounded by WAIT)."""
    seen = b""
    async with asyncio.timeout(WAIT):
        while needle not in seen:
            chunk = await stream.read(4096)
            if not chunk:
                raise AssertionError(f"{needle!r} never came; got {seen!r}")
            seen += chunk
    return seen


def test_the_venv_has_no_test_extras(venv: Venv) -> None:
    for module in ("pytest", "schemathesis", "playwright"):
        result = subprocess.run([venv.bin("python"), "-c", f"import {module}"], env=venv.env,
                                capture_output=True, timeout=30, check=False)
        assert result.returncode != 0, f"{module} is installed: not a runtime-only venv"


async def test_readme_quick_start(venv: Venv) -> None:
    serve = [*readme_command("hub serve --dev"), "--port", "0"]
    client = readme_command("python -m websockets")
    publish = readme_command("hub publish")
    assert serve[:3] == ["hub", "serve", "--dev"] and publish[:3] == ["hub", "publish", "news"]
    pipe = asyncio.subprocess.PIPE

    async with process(venv, serve, stdout=pipe, stderr=pipe) as node:
        assert node.stdout is not None and node.stderr is not None
        listening = LISTENING.search(await read_until(node.stdout, b")\n"))
        assert listening, "no listening line"
        url = listening.group(1).decode()
        async with httpx.AsyncClient(base_url=url, timeout=WAIT) as http:
            assert (await http.get("/readyz")).status_code == 200
            # the package data made it into the wheel: the admin page and the link page
            assert "Admin page" in (await http.get("/")).text
            assert (await http.get("/admin/admin.js")).status_code == 200

        ws_url = client[-1].replace("ws://127.0.0.1:8000", url.replace("http://", "ws://"))
        assert ws_url != client[-1], client
        async with process(venv, [*client[:-1], ws_url], stdin=pipe, stdout=pipe,
                           stderr=subprocess.STDOUT) as alice:
            assert alice.stdin is not None and alice.stdout is not None
            assert b'"user":"alice"' in await read_until(alice.stdout, b'"type":"welcome"')
            alice.stdin.write(readme_subscribe_frame().encode() + b"\n")
            await alice.stdin.drain()
            await read_until(alice.stdout, b'{"type":"subscribed","channel":"news"}')

            async with process(venv, [*publish, "--url", url], stdout=pipe,
                               stderr=pipe) as publisher:
                out, err = await asyncio.wait_for(publisher.communicate(), WAIT * 2)
            assert publisher.returncode == 0, err.decode()
            assert out.strip() == b"{}"
            await read_until(alice.stdout, b'"channel":"news","data":{"text":"hello"}')

            node.send_signal(15)  # SIGTERM: drain, then exit 0 (PROTOCOL §7)
            await read_until(alice.stdout, b"Connection closed: 1012")
        assert await asyncio.wait_for(node.wait(), 20) == 0
        stderr = await node.stderr.read()
    assert b"Traceback" not in stderr, stderr.decode()

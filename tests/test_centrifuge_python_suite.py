"""centrifuge-python's own test suite, from the sdist of the version the lock installs, run
against a hub configured like that suite's CI (its docker-compose.yml: HMAC secret
"secret", tokens without `exp`, the default namespace with history 100, presence, join/leave,
publishing subscribers and fossil deltas; `smallhistory` with 2). Its tests loop over
`use_protobuf` themselves, so this runs the JSON and the Protobuf variants.

The sdist is fetched from PyPI at test time with pip (nothing of it is vendored here); the
one change made to it is the server's address (it names localhost:8000, and this machine's
port 8000 is not ours). Only its files that talk to a server run (the others use its own
fake server); the tests excluded, and why, are in docs/protocol.md §11.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.needs import need
from tests.support import make_settings, running_node

SERVER_FILES = ["test_client.py", "test_ready.py", "test_background_tasks.py",
                "test_proxy.py", "test_ssl.py"]
EXCLUDED = [
    # It resolves one future per server-side subscription; the hub lists the personal
    # channel under both its names (@user and #user), and the second set_result raises in
    # the SDK's handler, which then drops the rest of the connect reply.
    "tests/test_client.py::TestServerSideSubscriptions::test_server_side_subs",
]
NAMESPACES = {
    "default": {"subscribe": "token", "publish": "any", "presence": True, "join_leave": True,
                "history_size": 100, "history_ttl": 300, "allowed_delta_types": ["fossil"]},
    "smallhistory": {"subscribe": "token", "publish": "any", "history_size": 2,
                     "history_ttl": 300},
    "example": {"subscribe": "token", "publish": "any", "presence": True, "join_leave": True,
                "history_size": 300, "history_ttl": 300},
}


def fetch_sdist(into: Path) -> Path | None:
    """The sdist of the installed centrifuge-python, unpacked; None when PyPI is out of
    reach."""
    version = importlib.metadata.version("centrifuge-python")
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", f"centrifuge-python=={version}", "-d", str(into)],
            check=True, timeout=120, capture_output=True,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    (archive,) = into.glob("centrifuge_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / archive.name.removesuffix(".tar.gz")


async def test_centrifuge_python_own_suite_json_and_protobuf(tmp_path: Path) -> None:
    sdist = await asyncio.to_thread(fetch_sdist, tmp_path)
    need(sdist is not None, "PyPI (pip download of centrifuge-python's sdist)")
    assert sdist is not None
    settings = make_settings(jwt_secret="secret", jwt_require_exp=False, namespaces=NAMESPACES)
    async with running_node(settings) as node:
        address = node.ws_url.removeprefix("ws://").removesuffix("/ws")
        for test_file in (sdist / "tests").glob("*.py"):
            text = test_file.read_text()
            test_file.write_text(re.sub(r"localhost:8000", address, text))
        command = [
            sys.executable, "-m", "pytest", *[f"tests/{name}" for name in SERVER_FILES],
            "-q", "-p", "no:cacheprovider", "-p", "no:asyncio", "--timeout", "30",
            "-W", "ignore", "-o", "log_level=WARNING",
            # helpers of the suite that pytest would collect as tests
            "-k", "not test_get_client_token and not test_get_subscription_token",
            *[f"--deselect={test}" for test in EXCLUDED],
        ]
        process = await asyncio.create_subprocess_exec(
            *command, cwd=sdist, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 240)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    summary = output.decode(errors="replace")[-3000:]
    assert process.returncode == 0, summary
    assert re.search(r"\d+ passed", summary), summary

"""Logs of a node process (PROTOCOL §10): `HUB_LOG_FORMAT=json` writes one JSON object per
line on stderr; access logs are off unless asked for."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import httpx
import websockets.sync.client

from tests.support import API_KEY, SECRET, NodeProcess, token

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)$")
LEVELS = {"debug", "info", "warning", "error", "critical"}
PROBES = ("/metrics", "/healthz", "/readyz")


def run_node(stderr: Path, **env: str) -> None:
    """Start a node writing its stderr to `stderr`, use it a little, drain it (SIGTERM) and
    wait for it to exit; the log file is complete afterwards."""
    node = NodeProcess(
        {
            "HUB_JWT_SECRET": SECRET, "HUB_API_KEY": API_KEY, "HUB_NODE_ID": "log-node",
            "HUB_DRAIN_DELAY": "0", "HUB_DRAIN_SECONDS": "0", **env,
        },
        stderr=stderr,
    )
    node.start()
    try:
        for path in PROBES:
            assert httpx.get(node.url + path, timeout=5).status_code == 200
        with websockets.sync.client.connect(
            node.ws_url, additional_headers={"Authorization": f"Bearer {token()}"},
            open_timeout=5,
        ) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
        node.signal(signal.SIGTERM)
        assert node.wait(15) == 0
    finally:
        node.kill()


def log_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    stderr = tmp_path / "node.err"
    # Dev mode logs a warning at start; the drain logs at info: at least two lines.
    run_node(stderr, HUB_LOG_FORMAT="json", HUB_DEV="1")
    lines = log_lines(stderr)
    assert len(lines) >= 2, lines
    entries: list[dict[str, Any]] = []
    for line in lines:
        entry = json.loads(line)  # every line is JSON on its own: no multi-line records
        assert isinstance(entry, dict), line
        assert TIME.match(entry["time"]), entry
        assert entry["level"] in LEVELS, entry
        assert entry["node"] == "log-node", entry
        assert isinstance(entry["event"], str) and entry["event"], entry
        entries.append(entry)
    levels = {entry["level"] for entry in entries}
    assert {"warning", "info"} <= levels, entries
    assert any("dev mode" in entry["event"] for entry in entries), entries
    assert any("drain" in entry["event"] for entry in entries), entries
    # Access logs are off by default in JSON too.
    assert not any(path in line for line in lines for path in PROBES), lines


def test_access_logs_are_off_by_default(tmp_path: Path) -> None:
    stderr = tmp_path / "node.err"
    run_node(stderr)  # text format, the default
    lines = log_lines(stderr)
    assert any("drain" in line for line in lines), lines  # stderr was captured
    for path in PROBES:
        assert not any(path in line for line in lines), lines
    assert not any("GET " in line or "WebSocket" in line for line in lines), lines


def test_access_logs_when_asked_for(tmp_path: Path) -> None:
    """The control for the test above: with HUB_ACCESS_LOG=1 the same requests are logged,
    as JSON objects when the format is json."""
    stderr = tmp_path / "node.err"
    run_node(stderr, HUB_LOG_FORMAT="json", HUB_ACCESS_LOG="1")
    entries = [json.loads(line) for line in log_lines(stderr)]
    for path in PROBES:
        assert any(path in entry["event"] for entry in entries), entries
    assert all(entry["node"] == "log-node" for entry in entries)

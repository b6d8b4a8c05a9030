"""deploy/docker-compose.yml: the same cluster as deploy/local-cluster.sh (Redis, three
nodes sharing it and one secret and API key, nginx in front on 8000), checked without a
Docker engine: its structure here, the nginx config it renders with `nginx -t`, and
`docker compose config` where the CLI has the compose plugin."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
NODES = ("node1", "node2", "node3")
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose() -> dict[str, Any]:
    """The file as Compose reads it, with `${VAR:-default}` at its defaults."""
    document: dict[str, Any] = yaml.safe_load(DEFAULT.sub(r"\2", COMPOSE.read_text()))
    return document


def local_cluster_default(variable: str) -> str:
    script = (DEPLOY / "local-cluster.sh").read_text()
    found = re.search(rf"{variable}=\$\{{{variable}:-([^}}]*)\}}", script)
    assert found, variable
    return found.group(1)


def test_services_match_the_local_cluster() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", *NODES, "nginx"}
    shared = {"HUB_JWT_SECRET", "HUB_API_KEY", "HUB_DRAIN_DELAY", "HUB_DRAIN_SECONDS"}
    for index, name in enumerate(NODES, start=1):
        node = services[name]
        environment = node["environment"]
        assert environment["HUB_NODE_ID"] == name
        assert environment["HUB_REDIS_URL"] == "redis://redis:6379/0"
        for variable in shared:
            assert str(environment[variable]) == local_cluster_default(variable), variable
        assert node["ports"] == [f"127.0.0.1:800{index}:8000"]  # local-cluster's 8001-8003
        assert node["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert node["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/readyz" in " ".join(node["healthcheck"]["test"])
        assert node["read_only"] is True and node["tmpfs"] == ["/tmp"]
    assert services["nginx"]["ports"] == ["127.0.0.1:8000:8000"]
    assert {name: dep["condition"] for name, dep in services["nginx"]["depends_on"].items()} \
        == dict.fromkeys(NODES, "service_healthy")
    assert services["redis"]["command"] == ["redis-server", "--save", "", "--appendonly", "no"]


def rendered_nginx_conf(state: Path) -> str:
    """What the nginx service's command writes, run here with the template's path and the
    state dir moved into `state`, and the node names pointed at loopback (no Docker DNS)."""
    command = compose()["services"]["nginx"]["command"][0]
    render = command.split(" && exec nginx")[0]
    render = render.replace("/etc/hub/nginx.conf.template", str(DEPLOY / "nginx.conf.template"))
    render = render.replace("/tmp/hub", str(state))
    subprocess.run(["sh", "-c", render], check=True, timeout=10)
    text = (state / "nginx" / "nginx.conf").read_text()
    assert not re.search(r"@(UPSTREAM_SERVERS|LISTEN|STATE_DIR)@", text), "a placeholder is left"
    for name in NODES:
        assert f"server {name}:8000 max_fails=2 fail_timeout=5s;" in text
    assert "listen 8000;" in text
    return re.sub(r"node(\d):8000", r"127.0.0.1:800\1", text)


def test_the_nginx_config_it_renders_passes_nginx_t(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    conf = rendered_nginx_conf(tmp_path)
    if nginx is None:
        pytest.skip("nginx is not installed")
    (tmp_path / "nginx" / "nginx.conf").write_text(conf)
    result = subprocess.run(
        [nginx, "-t", "-p", f"{tmp_path}/nginx/", "-c", f"{tmp_path}/nginx/nginx.conf",
         "-e", f"{tmp_path}/nginx/error.log"],
        capture_output=True, text=True, timeout=10, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30,
                           check=False)
    if probe.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_the_charts_default_ingress_routes_both_websocket_endpoints_and_no_probe() -> None:
    """helm/hub/values.yaml: an Ingress switched on with the default paths reaches `/ws`,
    `/connection/websocket` (what the README tells SDK users to use) and Centrifugo's other
    transports with `/emulation` (PROTOCOL §15), and no path of it
    covers `/metrics`, `/healthz` or `/readyz`, which need no key."""
    values = yaml.safe_load((DEPLOY.parent / "helm" / "hub" / "values.yaml").read_text())
    paths = [path["path"] for host in values["ingress"]["hosts"] for path in host["paths"]]
    for endpoint in ("/ws", "/connection/websocket", "/connection/http_stream",
                     "/connection/sse", "/connection/uni_sse", "/connection/uni_http_stream",
                     "/connection/uni_websocket", "/emulation"):
        assert any(endpoint.startswith(path) for path in paths), endpoint
    for private in ("/metrics", "/healthz", "/readyz"):
        assert not any(private.startswith(path) for path in paths), private

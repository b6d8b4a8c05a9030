"""`hub serve | check | token | publish`; `hub bench` only points to `python -m benchmarks`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from hub import __version__
from hub.settings import Settings, SettingsError, load_settings, variables


def _variables_epilog() -> str:
    """Every HUB_* variable with its default: the flags above are only the common ones."""
    defaults = Settings()
    lines = ["Every option is also a variable (a flag wins over its variable); the variables and",
             "their defaults (docs/protocol.md section 10 says what each does):", ""]
    for name, variable in variables().items():
        default = getattr(defaults, name)
        shown = "(unset)" if default in (None, "") else default
        if name == "node_id":
            shown = "(hostname-<6 random hex digits>)"
        if isinstance(shown, bool):
            shown = int(shown)
        lines.append(f"  {variable}={shown}")
    lines += ["", "`hub check` prints the values in effect and what would keep the node from "
              "serving."]
    return "\n".join(lines)


def _node_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `serve` and `check` (which loads the settings exactly as `serve` does)."""
    serve = parser
    serve.add_argument("--host", help="bind address (HUB_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (HUB_PORT, default 8000; 0 = any free)")
    serve.add_argument("--redis-url", dest="redis_url", help="Redis URL (HUB_REDIS_URL)")
    serve.add_argument("--node-id", dest="node_id", help="node id (HUB_NODE_ID)")
    serve.add_argument("--dev", action="store_const", const=True,
                       help="dev mode: no token needed, loopback only (HUB_DEV=1)")
    serve.add_argument("--config", help="TOML file with [namespaces.NAME] tables (HUB_CONFIG)")


def _serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, help_text in (
        ("serve", "run a node"),
        ("check", "print the configuration `serve` would run with, secrets masked, and warn "
                  "about what would keep it from serving; exit 2 on an error"),
    ):
        parser = commands.add_parser(
            name, help=help_text, epilog=_variables_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _node_flags(parser)


def _token_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="print an HS256 token signed with HUB_JWT_SECRET")
    token.add_argument("--sub", required=True, help="user id")
    token.add_argument("--channels", action="append", default=[], help="subscribe pattern")
    token.add_argument("--publish", action="append", default=[], help="publish pattern")
    token.add_argument("--ttl", type=float, default=3600, help="seconds until expiry")
    token.add_argument("--info", help="JSON object shown in presence")


def _publish_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    publish = commands.add_parser("publish", help="publish through a node's HTTP API")
    publish.add_argument("channel")
    publish.add_argument("data", help="JSON value")
    publish.add_argument("--event")
    publish.add_argument("--url", default=os.environ.get("HUB_URL", "http://127.0.0.1:8000"),
                         help="node or balancer address (HUB_URL, default http://127.0.0.1:8000)")
    publish.add_argument("--api-key", default=os.environ.get("HUB_API_KEY"),
                         help="the API key (HUB_API_KEY; none needed in dev mode)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub", description="WebSocket pub/sub hub")
    parser.add_argument("--version", action="version", version=f"hub {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _serve_parser(commands)
    _token_parser(commands)
    _publish_parser(commands)
    # The benchmark left the package (wheels and images do not carry it); `hub bench` stays
    # only to say where it went. "+" as prefix: any old option after it is accepted.
    bench = commands.add_parser("bench", help="moved: `python -m benchmarks` in a checkout",
                                prefix_chars="+", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _token(args: argparse.Namespace) -> int:
    from hub.auth import mint_token

    secret = os.environ.get("HUB_JWT_SECRET")
    if not secret:
        print("hub token: set HUB_JWT_SECRET", file=sys.stderr)
        return 2
    info = None
    if args.info:
        try:
            info = json.loads(args.info)
        except json.JSONDecodeError as exc:
            print(f"hub token: --info is not JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(info, dict):
            print("hub token: --info must be a JSON object", file=sys.stderr)
            return 2
    print(mint_token(secret, args.sub, ttl=args.ttl, channels=args.channels,
                     publish=args.publish, info=info))
    return 0


def _publish(args: argparse.Namespace) -> int:
    import asyncio

    import httpx
    import msgspec

    from hub.api import HubApiError, HubClient

    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        print(f"hub publish: data is not JSON: {exc}", file=sys.stderr)
        return 2

    async def publish() -> bytes:
        async with HubClient(args.url, args.api_key) as hub:
            return msgspec.json.encode(await hub.publish(args.channel, data, args.event))

    try:
        print(asyncio.run(publish()).decode())
    except HubApiError as exc:
        print(f"hub publish: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"hub publish: {args.url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    if args.command == "publish":
        return _publish(args)
    if args.command == "bench":
        print("hub bench: the benchmark moved; run `python -m benchmarks ...` from the "
              "repository root (see benchmarks/README.md)", file=sys.stderr)
        return 2
    flags = {k: v for k, v in vars(args).items() if k in
             {"host", "port", "redis_url", "node_id", "dev", "config"}}
    try:
        settings = load_settings(flags)
    except SettingsError as exc:
        print(f"hub {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        from hub.check import report

        print(report(settings))
        return 0
    from hub.server import serve

    return serve(settings)

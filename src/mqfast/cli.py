"""The ``mqfast`` command: ``mqfast serve`` runs the gateway; flags override the environment."""

from __future__ import annotations

import argparse
import sys

from mqfast import __version__
from mqfast.config import Settings
from mqfast.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mqfast",
        description="A fast HTTP gateway for messages. Configuration comes from environment "
        "variables (see README.md); the flags below override them.",
    )
    p.add_argument("--version", action="version", version=f"mqfast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--host", help="listen address (MESSAGE_QUEUE_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (MESSAGE_QUEUE_PORT, default 8087)")
    s.add_argument(
        "--workers", type=int, help="processes sharing the port (MESSAGE_QUEUE_WORKERS, default 1)"
    )
    s.add_argument(
        "--engine",
        choices=["embedded", "kafka"],
        help="storage engine (MESSAGE_QUEUE_ENGINE, default embedded)",
    )
    s.add_argument("--data-dir", help="embedded engine directory (MESSAGE_QUEUE_DATA_DIR)")
    t = sub.add_parser(
        "token",
        help="print a signed token for development (HMAC, from MESSAGE_QUEUE_JWT_SECRET)",
    )
    t.add_argument("--sub", required=True, help="the subject (sub claim)")
    t.add_argument(
        "--role", action="append", default=[], help="a role: admin, producer, consumer (repeat)"
    )
    t.add_argument(
        "--grant",
        action="append",
        default=[],
        metavar="TOPICS:ACTIONS[:GROUPS]",
        help="a grant, e.g. 'orders.*:produce,consume:billing' (repeat)",
    )
    t.add_argument("--ttl", default="1h", help="lifetime, e.g. 15m, 24h (default 1h)")
    return p


def _grant(text: str) -> dict[str, object]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ConfigError(f"--grant {text!r}: expected TOPICS:ACTIONS[:GROUPS]")
    grant: dict[str, object] = {"topics": parts[0], "actions": parts[1].split(",")}
    if len(parts) == 3 and parts[2]:
        grant["groups"] = parts[2].split(",")
    return grant


def _token(args: argparse.Namespace) -> int:
    from mqfast.auth import make_token
    from mqfast.config import parse_duration

    try:
        settings = Settings.from_env(host="127.0.0.1")
        ttl_s = parse_duration(args.ttl, "--ttl") / 1e9
        grants = [_grant(g) for g in args.grant]
        token = make_token(settings, args.sub, args.role or None, grants or None, ttl_s)
    except (ConfigError, ValueError) as e:
        print(f"mqfast token: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    if args.command != "serve":
        _parser().print_help()
        return 0 if args.command is None else 2
    try:
        settings = Settings.from_env(
            host=args.host,
            port=args.port,
            workers=args.workers,
            engine=args.engine,
            data_dir=args.data_dir,
        )
    except ConfigError as e:
        print(f"mqfast: invalid configuration: {e}", file=sys.stderr)
        return 2
    from mqfast.server import run  # imports the compiled core only when serving

    return run(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

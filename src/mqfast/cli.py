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
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
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

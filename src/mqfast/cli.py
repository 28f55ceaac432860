"""The ``mqfast`` command: ``mqfast serve`` runs the gateway; flags override the environment.

``produce``, ``consume``, ``topics`` and ``dlq`` talk to a running gateway through
:mod:`mqfast.client` (``--url``, default ``MQFAST_URL`` or ``http://127.0.0.1:8087``; the token
from ``MQFAST_TOKEN``), written in :mod:`mqfast.cli_client`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from mqfast import __version__
from mqfast.config import Settings
from mqfast.errors import ConfigError
from mqfast.log import configure_logging

if TYPE_CHECKING:
    from mqfast.crypto import Keyring


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
    r = sub.add_parser(
        "rewrap",
        help="re-wrap every stored data key under the active master key (to retire old ones)",
        description="After a new master key is active on every replica "
        "(MESSAGE_QUEUE_MASTER_KEY_ID), re-wrap the stored data keys under it; afterwards the "
        "old master key can be removed. Safe while the gateway runs. Exit 1 when some data keys "
        "could not be re-wrapped (their master key is not configured here).",
    )
    r.add_argument("--engine", choices=["embedded", "kafka"], help="MESSAGE_QUEUE_ENGINE")
    r.add_argument("--data-dir", help="embedded engine directory (MESSAGE_QUEUE_DATA_DIR)")
    from mqfast.cli_client import add_commands

    add_commands(p, sub)
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
    from mqfast.auth import ROLES, make_token
    from mqfast.config import parse_duration

    try:
        unknown = [r for r in args.role if r not in ROLES]
        if unknown:
            raise ConfigError(
                f"--role {unknown[0]!r}: expected one of {', '.join(ROLES)} "
                "(for anything narrower use --grant)"
            )
        settings = Settings.from_env(host="127.0.0.1")
        ttl_s = parse_duration(args.ttl, "--ttl") / 1e9
        if ttl_s <= 0:
            raise ConfigError(f"--ttl {args.ttl!r}: a token's lifetime must be longer than 0")
        grants = [_grant(g) for g in args.grant]
        token = make_token(settings, args.sub, args.role or None, grants or None, ttl_s)
    except (ConfigError, ValueError) as e:
        print(f"mqfast token: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _rewrap(args: argparse.Namespace) -> int:
    from mqfast.crypto import Keyring
    from mqfast.errors import Unavailable

    try:
        settings = Settings.from_env(host="127.0.0.1", engine=args.engine, data_dir=args.data_dir)
        keyring = Keyring.from_settings(settings)
        if keyring is None:
            raise ConfigError(
                "no master key is configured (MESSAGE_QUEUE_MASTER_KEYS or "
                "MESSAGE_QUEUE_MASTER_KEY_FILE)"
            )
        moved, skipped = asyncio.run(_rewrap_store(settings, keyring))
    except (ConfigError, Unavailable) as e:
        print(f"mqfast rewrap: {e}", file=sys.stderr)
        return 2
    print(f"re-wrapped {_count(moved)} under master key {keyring.active_id!r}")
    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
        print(
            f"mqfast rewrap: {_count(sum(skipped.values()))} could not be re-wrapped "
            f"({reasons}): keep the master keys they need",
            file=sys.stderr,
        )
        return 1
    return 0


def _count(n: int) -> str:
    return f"{n} data key" if n == 1 else f"{n} data keys"


async def _rewrap_store(settings: Settings, keyring: Keyring) -> tuple[int, dict[str, int]]:
    """Re-wrap the data keys of the configured engine's store: (how many, skipped by reason)."""
    from mqfast.crypto import Encryptor

    if settings.engine == "kafka":
        from mqfast.meta.postgres import PostgresMeta
        from mqfast.server import postgres_dsn

        meta = PostgresMeta(postgres_dsn(settings))
        await meta.start()
        try:
            rows, skipped = Encryptor(keyring).rewrapped(await meta.data_keys())
            for row in rows:
                await meta.put_data_key(*row)
        finally:
            await meta.close()
        return len(rows), skipped
    from mqfast.sinks.embedded import EmbeddedSink

    sink = EmbeddedSink(settings.data_dir, retention_interval_s=0, keyring=keyring)
    await sink.start()
    try:
        assert sink.encryptor is not None
        return sink.encryptor.rewrap()
    finally:
        await sink.close(5.0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    if args.command == "rewrap":
        return _rewrap(args)
    if getattr(args, "client_command", None) is not None:
        from mqfast.cli_client import run_command

        return run_command(args)
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
        # A JSON line like every other line of the server's, so a log pipeline keeps it.
        configure_logging("INFO")
        logging.getLogger("mqfast.server").error("invalid configuration", extra={"error": str(e)})
        return 2
    from mqfast.server import run  # imports the compiled core only when serving

    return run(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

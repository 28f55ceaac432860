"""What only SqliteMeta does, against a real SQLite file in ``tmp_path``: sharing the engine's
database file under a schema version of its own, and refusing a newer schema.

The behaviour both metadata stores promise (consumers, touches, sweeps, metric history) is tested
once for both, in ``test_meta_postgres.py`` (its ``backend`` fixture is ``sqlite`` or
``postgres``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from mqfast.errors import ConfigError, Unavailable
from mqfast.meta import MetaStore
from mqfast.meta.sqlite import SqliteMeta
from mqfast.sinks import Delivery
from mqfast.sinks.embedded import EmbeddedSink

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(asyncio.wait_for(coro, 30))


def test_sqlite_meta_is_a_meta_store(tmp_path: Path) -> None:
    store: MetaStore = SqliteMeta(str(tmp_path))
    assert isinstance(store, SqliteMeta)


# -- schema ------------------------------------------------------------------------------


def test_shares_the_engine_file_with_its_own_schema_version(tmp_path: Path) -> None:
    async def main() -> None:
        sink = EmbeddedSink(str(tmp_path), retention_interval_s=0)

        def on_done(batch: list[Delivery]) -> None:
            pass

        sink.bind(asyncio.get_running_loop(), on_done)
        await sink.start()
        try:
            # Two workers starting together: migrations are applied once, under the write lock.
            a, b = SqliteMeta(str(tmp_path)), SqliteMeta(str(tmp_path))
            await asyncio.gather(a.start(), b.start())
            await a.close()
            await b.close()
        finally:
            await sink.close(5)

    run(main())
    with sqlite3.connect(tmp_path / "mqfast.db") as conn:
        versions = dict(conn.execute("SELECT component, version FROM schema_version"))
        assert versions["meta"] == 3  # consumers and metric history, the audit log, grants
        assert versions["embedded"] >= 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    run(_start_close(tmp_path))
    with sqlite3.connect(tmp_path / "mqfast.db") as conn:
        conn.execute("UPDATE schema_version SET version = 99 WHERE component = 'meta'")

    async def main() -> None:
        store = SqliteMeta(str(tmp_path))
        with pytest.raises(ConfigError, match="newer"):
            await store.start()
        with pytest.raises(Unavailable):
            await store.get_consumer("c1")
        await store.close()

    run(main())


async def _start_close(data_dir: Path) -> None:
    store = SqliteMeta(str(data_dir))
    await store.start()
    await store.close()

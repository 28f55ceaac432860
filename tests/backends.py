"""Real Kafka, PostgreSQL and Redis for tests, from ``scripts/services.py``.

Session fixtures, each started the first time a test asks for it and stopped when the session
ends:

- ``kafka``: one KRaft node (replication 1);
- ``kafka3``: three broker+controller nodes (replication 3, min.insync.replicas 2), for faults;
- ``postgres``: role, password and database ``mqfast``;
- ``redis``: append-only file, fsync every second;
- ``services``: the ``scripts/services.py`` module itself (``env_for``, ``ServiceError``...).

A test may stop or kill any of them, and start it again itself; whatever it leaves stopped
is started again (same ports, same data) before the next test runs.

What is missing (Debian packages, Kafka's jars) is installed before the first test, when any
collected test names one of these fixtures, so that the install time never counts against a
test's timeout.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

log = logging.getLogger("mqfast.services")

SERVICES_PATH = Path(__file__).resolve().parent.parent / "scripts" / "services.py"


def load_services() -> ModuleType:
    """``scripts/services.py`` as a module (``scripts`` is no package), loaded once."""
    name = "mqfast_services"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, SERVICES_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses and pickling look it up
        spec.loader.exec_module(module)
    return module


services = load_services()

# Started this session, in start order; the autouse fixture keeps them running between tests.
_started: list[Any] = []

# Which services each fixture needs installed. ``cluster_env`` (tests/conftest.py) and the
# conformance suite's Kafka engine reach all three through request.getfixturevalue.
_NEEDS: dict[str, tuple[bool, bool, bool]] = {
    "kafka": (True, False, False),
    "kafka3": (True, False, False),
    "postgres": (False, True, False),
    "redis": (False, False, True),
    "cluster_env": (True, True, True),
}


def pytest_collection_finish(session: pytest.Session) -> None:
    need = [False, False, False]
    for item in session.items:
        names = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "kafka" in callspec.params.values():
            names.add("cluster_env")
        for name in names & _NEEDS.keys():
            need = [a or b for a, b in zip(need, _NEEDS[name], strict=True)]
    if not any(need):
        return
    missing = services.what_is_missing(*need)
    if not missing:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"services.py: installing {', '.join(missing)} for the tests")
    services.ensure_installed(*need)


def _revive() -> None:
    for svc in _started:
        if not svc.running:
            log.warning("restarting %r, left stopped by an earlier test", svc)
            try:
                svc.start()
            except services.ServiceError as e:
                # Raised in another test's setup, so say where it comes from.
                raise services.ServiceError(f"restarting {svc!r} failed: {e}") from e


@pytest.fixture(autouse=True)
def _backends_running() -> Iterator[None]:
    """Start again whatever a test stopped or killed, so the next one finds it running."""
    _revive()
    yield
    _revive()


@pytest.fixture(scope="session", name="services")
def services_module() -> ModuleType:
    return services


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A single-node Kafka (``services.Kafka``): ``.bootstrap``, ``.nodes``, ``.stop()``..."""
    k = services.start_kafka(tmp_path_factory.mktemp("kafka"), brokers=1)
    _started.append(k)
    yield k
    _started.remove(k)
    k.stop()


@pytest.fixture(scope="session")
def kafka3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Three Kafka brokers, each also a controller: ``kill_node(id)``, ``start_node(id)``..."""
    k = services.start_kafka(tmp_path_factory.mktemp("kafka3"), brokers=3)
    _started.append(k)
    yield k
    _started.remove(k)
    k.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """PostgreSQL (``services.Postgres``): ``.dsn``, ``.host``, ``.port``, ``.user``..."""
    pg = services.start_postgres(tmp_path_factory.mktemp("postgres"))
    _started.append(pg)
    yield pg
    _started.remove(pg)
    pg.destroy()


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Redis (``services.Redis``): ``.host``, ``.port``, ``.url``, ``.ping()``..."""
    r = services.start_redis(tmp_path_factory.mktemp("redis"))
    _started.append(r)
    yield r
    _started.remove(r)
    r.stop()

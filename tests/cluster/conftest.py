"""Several mqfast replicas against one Kafka, PostgreSQL and Redis (real services, loopback)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conformance.conftest import FAST_ENV, Gateway
from tests.conftest import MakeServer

Replicas = Callable[..., list[Gateway]]


@pytest.fixture
def replicas(make_server: MakeServer, cluster_env: dict[str, str]) -> Replicas:
    """``replicas(n, **env)``: n gateways on the Kafka engine sharing this session's services."""

    def start(n: int = 3, **env: str) -> list[Gateway]:
        full = {"MESSAGE_QUEUE_ENGINE": "kafka", **cluster_env, **FAST_ENV, **env}
        return [Gateway(make_server(**full), "kafka") for _ in range(n)]

    return start

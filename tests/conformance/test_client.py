"""mqfast.client and the ``mqfast`` commands on every engine: the same round trips.

The client's own rules (batching, retries, errors, leases) are tested in
``tests/integration/test_client.py`` and ``test_cli_kit.py`` on the embedded engine; here the
parts that depend on the engine's answers run on each: batch produce with per-message
results, consume with ack/nack and redelivery, lease extension, release on close, redrive.
"""

from __future__ import annotations

import json
import time

from mqfast.client import Client, ItemError, OutgoingMessage, ProduceResult
from tests.conformance.conftest import DELIVERY_LIMIT, Gateway, unique
from tests.integration.test_cli_kit import mqfast


def test_produce_consume_ack_nack_and_redrive(engine_server: Gateway) -> None:
    t = unique("client")
    with Client(engine_server.proc.base_url) as client:
        client.create_topic(t, partitions=2)
        with client.producer(t, linger=0.01) as producer:
            futures = [producer.send(f"m{i}", key=f"k{i % 3}") for i in range(50)]
        results = [f.result() for f in futures]
        assert all(isinstance(r, ProduceResult) and r.topic == t for r in results)
        by_key: dict[str, set[int]] = {}
        for i, r in enumerate(results):
            by_key.setdefault(f"k{i % 3}", set()).add(r.partition)
        assert all(len(p) == 1 for p in by_key.values())  # a key keeps its partition

        got: dict[str, int] = {}
        with client.consumer(t, "g", poll_timeout=5, visibility_timeout=30) as consumer:
            for m in consumer:
                got[m.content] = m.delivery_count
                if m.content == "m7":
                    consumer.nack(m, "poison", requeue_delay=0)  # delivered again at once
                else:
                    consumer.ack(m)
                if len(got) == 50 and got["m7"] == DELIVERY_LIMIT:
                    break  # close() sends the last nack: m7 is dead-lettered at the limit
        assert {c for k, c in got.items() if k != "m7"} == {1}
        assert client.consume(t, "g", "late", timeout=0) == []
        assert client.redrive(t) == {"topic": t, "moved": 1}
        [back] = client.consume(t, "g", "late", timeout=5)
        assert (back.content, back.headers["x-mqfast-redriven-from"]) == ("m7", f"{t}.dlq")


def test_slow_work_keeps_its_lease_and_close_releases_the_rest(engine_server: Gateway) -> None:
    t = unique("client")
    with Client(engine_server.proc.base_url) as client:
        client.produce_batch([OutgoingMessage(f"m{i}") for i in range(5)], t)
        with client.consumer(
            t, "g", batch_size=5, poll_timeout=5, visibility_timeout=2.0
        ) as consumer:
            first = next(iter(consumer))
            time.sleep(5)  # longer than the lease: extended in the background
            consumer.ack(first)
            [result] = consumer.commit()
            assert not isinstance(result, ItemError), result
            assert result.status == "acknowledged"
        again = client.consume(t, "g", "other", max_messages=10, timeout=5)
        assert sorted(m.content for m in again) == ["m1", "m2", "m3", "m4"]


def test_the_commands_round_trip(engine_server: Gateway) -> None:
    t = unique("cli")
    url = engine_server.proc.base_url
    assert mqfast(url, "topics", "create", t, "--partitions", "2").returncode == 0
    produced = mqfast(url, "produce", t, stdin=b"".join(b"line %d\n" % i for i in range(300)))
    assert (produced.returncode, produced.stderr) == (0, b"")
    consumed = mqfast(url, "consume", t, "--group", "g", "--max", "300")
    assert consumed.returncode == 0, consumed.stderr
    contents = sorted(json.loads(line)["content"] for line in consumed.stdout.splitlines())
    assert contents == sorted(f"line {i}" for i in range(300))
    rest = mqfast(url, "consume", t, "--group", "g", "--wait", "0")
    assert (rest.returncode, rest.stdout) == (0, b"")

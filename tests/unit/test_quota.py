"""Per-subject produce quotas (``mqfast.quota``): local buckets, and the cluster through Redis.

Local-only tests run on an injected clock, so rates and bursts are checked exactly. The Redis
tests use the session's real Redis (``tests.backends``): three ``Quotas`` with a client each
stand in for three replicas. Each test uses subjects of its own, so the state earlier tests left
in Redis never matters. Only counts are asserted, never latencies.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from mqfast import quota
from mqfast.config import Settings
from mqfast.quota import Quotas

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(asyncio.wait_for(coro, 30))


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def local(clock: Clock, **kw: Any) -> Quotas:
    return Quotas(Settings(**kw), None, clock=clock)


def take_all(q: Quotas, subject: str, messages: int = 1, nbytes: int = 0) -> int:
    """How many requests pass in a row on the hot path."""
    n = 0
    while q.try_take(subject, messages, nbytes):
        n += 1
        assert n < 1_000_000
    return n


def subject() -> str:
    return f"sub-{uuid.uuid4().hex[:12]}"


# ---- local only (no Redis) ----------------------------------------------------------------


def test_local_rate_and_burst() -> None:
    clock = Clock()  # steps of 1/16 s: exact in binary, so are the token counts
    q = local(clock, quota_messages=8.0, quota_burst_s=2.0)
    assert q.enabled
    assert take_all(q, "alice") == 16  # burst = rate × burst_s
    clock.advance(0.5)
    assert take_all(q, "alice") == 4
    clock.advance(1 / 16)
    assert take_all(q, "alice") == 0  # half a message
    clock.advance(1 / 16)
    assert take_all(q, "alice") == 1
    clock.advance(3600)
    assert take_all(q, "alice") == 16  # a long pause refills to the burst, no further
    assert take_all(q, "bob") == 16  # subjects are independent


def test_local_bytes_dimension() -> None:
    clock = Clock()
    q = local(clock, quota_bytes=1000.0, quota_burst_s=1.0)
    assert q.enabled
    assert q.try_take("alice", 1, 600)
    assert not q.try_take("alice", 1, 500)
    assert q.try_take("alice", 1, 400)  # the refusal took nothing
    assert not q.try_take("alice", 1, 1)
    clock.advance(0.1)
    assert q.try_take("alice", 1000, 100)  # messages are unlimited
    assert not q.try_take("alice", 1, 1)


def test_local_both_dimensions() -> None:
    clock = Clock()
    q = local(clock, quota_messages=10.0, quota_bytes=1000.0, quota_burst_s=1.0)
    # Small messages: the message count binds.
    assert take_all(q, "small", 1, 10) == 10
    # Large messages: the bytes bind.
    assert take_all(q, "large", 1, 250) == 4
    # A refusal on one dimension takes nothing from the other.
    assert q.try_take("large", 6, 0)
    assert not q.try_take("large", 1, 0)
    clock.advance(0.5)
    assert take_all(q, "small", 1, 10) == 5
    assert take_all(q, "large", 1, 100) == 5  # 500 bytes back, and 5 messages


def test_disabled_when_zero() -> None:
    q = Quotas(Settings(), None)
    assert not q.enabled
    for _ in range(10_000):
        assert q.try_take("alice", 1000, 1 << 20)
    assert run(q.acquire("alice", 1, 1)) == 0.0
    assert q.stats()["subjects"] == 0
    # Disabled even with Redis configured: nothing is ever asked of it.
    assert not Quotas(Settings(quota_messages=0.0, quota_bytes=0.0), None).enabled


def test_local_retry_after() -> None:
    clock = Clock()
    q = local(clock, quota_messages=10.0, quota_burst_s=1.0)
    assert take_all(q, "alice") == 10

    async def main() -> None:
        wait = await q.acquire("alice", 1, 0)
        assert wait == pytest.approx(0.1)
        wait5 = await q.acquire("alice", 5, 0)
        assert wait5 == pytest.approx(0.5)
        clock.advance(wait)
        assert await q.acquire("alice", 1, 0) == 0.0
        assert await q.acquire("alice", 1, 0) > 0

    run(main())
    assert q.stats()["rejected"] == 3
    assert q.stats()["redis_fallback"] == 0  # no Redis is not a fallback


def test_local_request_larger_than_burst() -> None:
    clock = Clock()
    q = local(clock, quota_bytes=1000.0, quota_burst_s=1.0)

    async def main() -> None:
        assert not q.try_take("alice", 1, 5000)
        assert await q.acquire("alice", 1, 5000) == 0.0  # a full bucket lets it through
        wait = await q.acquire("alice", 1, 1)
        assert wait == pytest.approx(4.001)  # ... and the average holds
        clock.advance(2.0)
        assert await q.acquire("alice", 1, 5000) == pytest.approx(3.0)  # not full yet

    run(main())


def test_local_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quota, "MAX_SUBJECTS", 50)
    q = local(Clock(), quota_messages=10.0)
    for i in range(1000):
        assert q.try_take(f"s{i}", 1, 0)
    assert q.stats()["subjects"] <= 50


def test_local_idle_subjects_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quota, "IDLE_S", 0.2)
    monkeypatch.setattr(quota, "TICK_S", 0.01)
    q = Quotas(Settings(quota_messages=1000.0, quota_burst_s=0.01), None)

    async def main() -> None:
        await q.start()
        try:
            for i in range(100):
                assert q.try_take(f"s{i}", 1, 0)
            assert q.stats()["subjects"] == 100
            for _ in range(200):
                await asyncio.sleep(0.01)
                if q.stats()["subjects"] == 0:
                    break
            assert q.stats()["subjects"] == 0
        finally:
            await q.close()

    run(main())


# ---- against Redis ------------------------------------------------------------------------


def cluster_settings(redis: Any, **kw: Any) -> Settings:
    return Settings(redis_host=redis.host, redis_port=redis.port, **kw)


class Replica:
    """One replica's quotas, with a Redis client of its own."""

    def __init__(self, settings: Settings) -> None:
        self.client = quota.connect(settings)
        self.quotas = Quotas(settings, self.client)

    async def start(self, background: bool = True) -> Replica:
        if background:
            await self.quotas.start()
        return self

    async def close(self) -> None:
        await self.quotas.close()
        await self.client.aclose()

    async def decide(self, subject: str, messages: int, nbytes: int) -> float:
        """What the server does with one produce: hot path, then slow path if needed."""
        if self.quotas.try_take(subject, messages, nbytes):
            return 0.0
        return await self.quotas.acquire(subject, messages, nbytes)


async def hammer(
    replicas: list[Replica], subj: str, seconds: float, nbytes: int, workers: int = 4
) -> tuple[list[int], float]:
    """Every replica's workers produce to ``subj`` as fast as allowed; accepted per replica,
    and the seconds from the first request to the end."""
    accepted = [0] * len(replicas)
    start = time.monotonic()
    end = start + seconds

    async def worker(i: int) -> None:
        r = replicas[i]
        while time.monotonic() < end:
            wait = await r.decide(subj, 1, nbytes)
            if wait == 0.0:
                accepted[i] += 1
                await asyncio.sleep(0)
            else:
                assert wait > 0
                await asyncio.sleep(min(wait, 0.01))

    await asyncio.gather(*(worker(i) for i in range(len(replicas)) for _ in range(workers)))
    return accepted, time.monotonic() - start


@pytest.mark.parametrize(
    ("limits", "nbytes", "rate"),
    [
        ({"quota_messages": 1000.0}, 10, 1000.0),  # messages per second bind
        ({"quota_messages": 100_000.0, "quota_bytes": 200_000.0}, 500, 400.0),  # bytes bind
    ],
    ids=["messages", "bytes"],
)
def test_three_replicas_share_the_limit(
    redis: Any, limits: dict[str, float], nbytes: int, rate: float
) -> None:
    burst_s = 0.5
    settings = cluster_settings(redis, quota_burst_s=burst_s, quota_replicas=3, **limits)

    async def main() -> None:
        replicas = [await Replica(settings).start() for _ in range(3)]
        try:
            subj = subject()
            accepted, elapsed = await hammer(replicas, subj, 3.0, nbytes)
            for r in replicas:
                assert r.quotas.stats()["redis_fallback"] == 0
                assert r.quotas.stats()["redis_down"] == 0
        finally:
            for r in replicas:
                await r.close()
        total = sum(accepted)
        # The bound: limit × seconds + burst + one chunk per replica. Redis grants at most
        # burst + rate × t over any t and nothing is accepted that was not granted, so the
        # chunks the replicas hold are already inside burst + rate × t; they stay in the bound
        # as a margin for the clocks (this one measures, Redis's decides).
        chunk = max(1.0, rate * quota.CHUNK_S)
        bound = rate * elapsed + rate * burst_s + 3 * chunk
        print(f"accepted {accepted} = {total} in {elapsed:.2f}s, bound {bound:.0f}")
        assert total <= bound
        assert total >= 0.6 * rate * elapsed  # not starved
        assert min(accepted) >= 0.1 * total  # nor is any replica

    run(main())


def test_subjects_are_independent(redis: Any) -> None:
    rate, burst = 10.0, 20
    settings = cluster_settings(redis, quota_messages=rate, quota_burst_s=burst / rate)

    async def drain(r: Replica, subj: str) -> tuple[int, float]:
        start = time.monotonic()
        n = 0
        while await r.decide(subj, 1, 0) == 0.0:
            n += 1
        return n, time.monotonic() - start

    async def main() -> None:
        a, b = await Replica(settings).start(), await Replica(settings).start()
        try:
            greedy, quiet = subject(), subject()
            n, elapsed = await drain(a, greedy)
            assert burst <= n <= burst + rate * elapsed + 1  # what refilled meanwhile
            # The other replica finds it spent (5: more than can refill meanwhile).
            assert await b.decide(greedy, 5, 0) > 0
            m, elapsed = await drain(b, quiet)
            assert burst <= m <= burst + rate * elapsed + 1
        finally:
            await a.close()
            await b.close()

    run(main())


def test_concurrent_callers_share_one_round_trip(redis: Any) -> None:
    settings = cluster_settings(redis, quota_messages=1000.0, quota_burst_s=1.0)

    async def main() -> None:
        r = await Replica(settings).start(background=False)
        try:
            subj = subject()
            waits = await asyncio.gather(*(r.quotas.acquire(subj, 1, 0) for _ in range(20)))
            assert waits == [0.0] * 20
            assert r.quotas.stats()["grants"] == 1
            # The grant was a chunk: the hot path spends the rest without Redis.
            chunk = int(1000 * quota.CHUNK_S)
            assert take_all(r.quotas, subj) == chunk - 20
            assert r.quotas.stats()["grants"] == 1
        finally:
            await r.close()

    run(main())


async def debt_s(client: Any, subj: str) -> float:
    """Seconds the subject's message bucket is in debt, on Redis's clock (0: full)."""
    tat = await client.hget(quota.KEY_PREFIX + subj, "m")
    sec, usec = await client.time()
    return 0.0 if tat is None else max(0.0, (float(tat) - (sec * 1e6 + usec)) / 1e6)


@pytest.mark.parametrize("how", ["close", "idle"])
def test_unspent_allowance_goes_back(redis: Any, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setattr(quota, "CHUNK_S", 2.0)  # grants of 200 messages: 2 s of debt
    monkeypatch.setattr(quota, "IDLE_S", 0.2)
    monkeypatch.setattr(quota, "TICK_S", 0.01)
    rate = 100.0
    settings = cluster_settings(redis, quota_messages=rate, quota_burst_s=5.0)

    async def main() -> None:
        r = await Replica(settings).start(background=how == "idle")
        try:
            subj = subject()
            assert await r.decide(subj, 1, 0) == 0.0
            assert await debt_s(r.client, subj) > 1.0  # 200 granted, 1 spent
            if how == "close":
                await r.quotas.close()
            else:
                for _ in range(200):
                    await asyncio.sleep(0.01)
                    if r.quotas.stats()["subjects"] == 0:
                        break
                assert r.quotas.stats()["subjects"] == 0
                for _ in range(50):  # forgotten first, then given back
                    if await debt_s(r.client, subj) <= 1 / rate:
                        break
                    await asyncio.sleep(0.01)
            assert await debt_s(r.client, subj) <= 1 / rate  # only the one spent remains
        finally:
            await r.close()

    run(main())


def test_retry_after_from_redis(redis: Any) -> None:
    rate = 100.0
    settings = cluster_settings(redis, quota_messages=rate, quota_burst_s=0.1)

    async def main() -> None:
        # No background top-ups: nothing but these calls takes from the bucket.
        r = await Replica(settings).start(background=False)
        try:
            subj = subject()
            while (wait := await r.decide(subj, 1, 0)) == 0.0:
                pass
            assert 0 < wait <= 1 / rate + 1e-6  # less than one message left
            wait5 = await r.quotas.acquire(subj, 5, 0)
            assert 3 / rate < wait5 <= 5 / rate + 1e-6
            await asyncio.sleep(wait5 + 0.005)
            assert await r.quotas.acquire(subj, 5, 0) == 0.0  # the Retry-After was enough
            assert r.quotas.stats()["rejected"] == 2
        finally:
            await r.close()

    run(main())


def test_redis_request_larger_than_burst(redis: Any) -> None:
    rate = 1000.0
    settings = cluster_settings(redis, quota_bytes=rate, quota_burst_s=1.0)

    async def main() -> None:
        r = await Replica(settings).start(background=False)
        try:
            subj = subject()
            assert await r.decide(subj, 1, 5000) == 0.0  # a full bucket lets it through
            wait = await r.quotas.acquire(subj, 1, 1)
            assert 3.0 < wait <= 4.001 + 1e-6  # ... and the average holds: 4 s of debt
        finally:
            await r.close()

    run(main())


def test_redis_down_falls_back_to_the_local_share(redis: Any) -> None:
    rate, replicas = 300.0, 3
    settings = cluster_settings(
        redis, quota_messages=rate, quota_burst_s=1.0, quota_replicas=replicas
    )
    share = rate / replicas

    async def main() -> None:
        r = await Replica(settings).start()
        try:
            assert await r.decide(subject(), 1, 0) == 0.0
            assert r.quotas.stats()["redis_down"] == 0
            redis.stop()
            subj = subject()
            accepted, elapsed = await hammer([r], subj, 1.0, 0, workers=2)
            stats = r.quotas.stats()
            print(f"fallback: accepted {accepted[0]} in {elapsed:.2f}s, share {share}/s")
            assert stats["redis_down"] == 1
            assert stats["redis_fallback"] >= accepted[0]
            # A full bucket of the local share (its burst), then the share's rate.
            assert share * 1.0 <= accepted[0] <= share * 1.0 + share * elapsed + 1
        finally:
            redis.start()
        try:
            for _ in range(100):
                if r.quotas.stats()["redis_down"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert r.quotas.stats()["redis_down"] == 0  # recovered by itself
            fallback = r.quotas.stats()["redis_fallback"]
            grants = r.quotas.stats()["grants"]
            assert await r.decide(subject(), 1, 0) == 0.0
            assert r.quotas.stats()["grants"] > grants  # decided through Redis again
            assert r.quotas.stats()["redis_fallback"] == fallback
        finally:
            await r.close()

    run(main())

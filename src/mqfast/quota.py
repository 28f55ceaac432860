"""Per-subject produce quotas: messages per second and bytes per second, cluster-wide.

The limit
    A subject (the token's ``sub``, or the claim ``MESSAGE_QUEUE_QUOTA_CLAIM`` names) may produce
    ``quota_messages`` messages and ``quota_bytes`` bytes per second across every replica, with
    bursts of ``rate × quota_burst_s``. A dimension set to 0 is unlimited; with both at 0 the
    quotas are off (``enabled`` is False). Over quota, produce answers 429 with the Retry-After
    that ``acquire`` returns.

Where the state is
    Redis holds the only authoritative state: per subject one GCRA per dimension, i.e. the
    *theoretical arrival time* of the next unit, in microseconds of Redis's own clock (``TIME``
    inside the script, so the replicas' clocks never matter). Key ``mq:quota:<subject>``, a hash
    with fields ``m`` (messages) and ``b`` (bytes), expiring once its bucket would be full again.

How a request is decided
    Nobody asks Redis per request. Each replica holds, per subject, a local *allowance*: units
    Redis has already granted to it, obtained in grants of about ``CHUNK_S`` of the rate (or the
    request, when larger) by one atomic script, ``_GRANT``: both dimensions in one call, all or
    nothing.

    - ``try_take`` (the hot path: synchronous, no I/O, no logging, and in this mode no clock
      read either) spends local allowance, or says no without spending anything.
    - ``acquire`` (the slow path, only after ``try_take`` said no) fetches a grant, one round trip
      shared by the concurrent callers of the subject, and takes from it; when Redis has too
      little, nothing is granted and Redis's answer says how long until there is enough: that is
      the Retry-After.
    - The background task, every ``TICK_S``, tops up the subjects that would run out within the
      next tick at the pace they were spent during the last one, by what they spent (at least a
      chunk), in one pipeline for all of them: a subject used steadily rarely meets the slow
      path, and one used once costs no more than its first grant. A subject unused for
      ``IDLE_S`` gives its allowance back (``_GIVE``) and is forgotten.

Accuracy
    A unit is accepted only out of allowance Redis granted, and Redis grants at most
    ``burst + rate × t`` over any span ``t``: the cluster never accepts more than the limit. The
    error goes the other way only: allowance a replica holds but has not spent (per subject and
    replica, under two ticks' worth of its spending, or two chunks) is unavailable to the others
    until spent or given back, and the allowance of a subject evicted from a full table is lost.

Redis down
    Any Redis error, or a round trip slower than ``REDIS_TIMEOUT_S``, switches the replica to the
    documented fallback: a local token bucket per subject at ``rate / quota_replicas`` (burst
    likewise), so that with ``MESSAGE_QUEUE_QUOTA_REPLICAS`` set to the number of replicas the
    cluster stays within the limit (a replica is one process: with ``MESSAGE_QUEUE_WORKERS`` above
    1, count every worker of every replica). Every decision made that way is counted
    (``stats()["redis_fallback"]``) and each change of state is logged once. The background task
    tries Redis every ``PROBE_S``; once it answers, the local buckets are dropped and the replica
    takes grants from Redis again (what it accepted meanwhile is not charged there).

Without Redis
    ``redis=None`` (embedded engine, one process): a plain local token bucket per subject at the
    full rate (the only mode that reads the clock on the hot path).

Requests larger than the burst
    They could never pass, so one passes when the bucket is full, and the bucket goes into debt
    (the arrival time moves past ``now + burst``): the average rate still holds.

Memory
    At most ``MAX_SUBJECTS`` subjects are kept locally (idle ones are forgotten, and when the table
    is full the oldest entry is dropped); in Redis each key expires when its bucket is full again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from mqfast.config import Settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger("mqfast.quota")

T = TypeVar("T")

CHUNK_S = 0.05  # a grant is this much of the rate (or the request, when larger)
TICK_S = 0.05  # background top-up period: a steady subject spends about a chunk per tick
IDLE_S = 1.0  # a subject unused this long gives its allowance back and is forgotten
PROBE_S = 1.0  # while Redis is down, try it again this often
REDIS_TIMEOUT_S = 0.5  # a round trip slower than this counts as Redis down
MAX_SUBJECTS = 100_000  # subjects kept locally; beyond, the oldest is dropped
MAX_PIPELINE = 1000  # top-ups or give-backs sent in one pipeline
KEY_PREFIX = "mq:quota:"
_ROUNDS = 3  # grants one acquire waits for before giving up on allowance others took first

_REDIS = 0  # grants from Redis
_LOCAL = 1  # no Redis configured: local buckets at the full rate
_FALLBACK = 2  # Redis down: local buckets at the replica's share

# The allowance and burst of a dimension without limit: never spent in practice (2**60 bytes
# is 36 years at 1 GB/s), and an int, as Redis's grants are: int arithmetic is the fast path.
_UNLIMITED = 1 << 60

# KEYS[1]: the subject's hash (fields m, b: theoretical arrival time in µs of Redis's clock).
# ARGV, for m then b: rate per second (0: unlimited), burst, need, want.
# Grants nothing unless every limited dimension has `need` available (for a need above the
# burst: a full bucket); else, per dimension, as much as is available between need and want.
# Returns {granted m, granted b, µs until `need` is available (0 when granted)}.
_GRANT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = redis.call('HMGET', KEYS[1], 'm', 'b')
local names = {'m', 'b'}
local dims = {}
local wait = 0
for i = 1, 2 do
  local rate = tonumber(ARGV[i * 4 - 3]) / 1000000
  if rate > 0 then
    local burst = tonumber(ARGV[i * 4 - 2])
    local need = tonumber(ARGV[i * 4 - 1])
    local at = math.max(tonumber(tat[i]) or now, now)
    local avail = burst - (at - now) * rate
    local least = math.min(need, burst)
    if avail < least then wait = math.max(wait, (least - avail) / rate) end
    dims[i] = {rate, need, tonumber(ARGV[i * 4]), at, avail}
  end
end
if wait > 0 then return {0, 0, math.ceil(wait)} end
local got = {0, 0}
local last = now
for i = 1, 2 do
  local d = dims[i]
  if d then
    local g = math.max(d[2], math.min(d[3], math.floor(d[5])))
    local at = d[4] + g / d[1]
    redis.call('HSET', KEYS[1], names[i], string.format('%.17g', at))
    got[i] = g
    if at > last then last = at end
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil((last - now) / 1000) + 1000)
return {got[1], got[2], 0}
"""

# KEYS[1]: the subject's hash; ARGV, for m then b: rate per second, units given back unspent.
_GIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local names = {'m', 'b'}
for i = 1, 2 do
  local rate = tonumber(ARGV[i * 2 - 1]) / 1000000
  local n = tonumber(ARGV[i * 2])
  if rate > 0 and n > 0 then
    local at = tonumber(redis.call('HGET', KEYS[1], names[i]))
    if at and at > now then
      redis.call('HSET', KEYS[1], names[i], string.format('%.17g', math.max(now, at - n / rate)))
    end
  end
end
return 1
"""


def connect(settings: Settings, timeout_s: float = REDIS_TIMEOUT_S) -> aioredis.Redis:
    """A Redis client fit for quotas: short timeouts, one immediate retry (a pooled connection
    that died with a Redis restart), no backoff: a slow answer is worse than the fallback.
    The caller owns it and closes it."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis(
        host=settings.redis_host,
        port=settings.redis_port,
        db=settings.redis_db,
        password=settings.redis_password or None,
        ssl=settings.redis_tls,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=15,
    )


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: an abandoned call's error is no news


class _Subject:
    """One subject's local allowance (Redis mode) or local bucket (the other modes)."""

    __slots__ = (
        "b",
        "base_b",
        "base_m",
        "demand_b",
        "demand_m",
        "fetch",
        "key",
        "m",
        "need_b",
        "need_m",
        "seen",
        "stamp",
        "touched",
        "wait",
    )

    def __init__(self, key: str, m: float, b: float, stamp: float, seen: int) -> None:
        self.key = key
        self.m = m  # messages that may be taken now (_UNLIMITED: no limit)
        self.b = b  # bytes likewise
        self.base_m = m  # allowance when the background task last looked, plus grants since
        self.base_b = b
        self.stamp = stamp  # local buckets: when last refilled
        self.touched = False  # used since the background task last looked
        self.seen = seen  # the tick it was last seen used
        self.fetch: asyncio.Future[None] | None = None  # the grant in flight
        self.need_m = 0  # the request the grant in flight is for
        self.need_b = 0
        self.demand_m = 0  # every request waiting for it
        self.demand_b = 0
        self.wait = 0.0  # Retry-After of the last refused grant, 0 when granted


class Quotas:
    """Per-subject produce quotas (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``redis`` None: local only (one process), a token bucket per subject at the full
        rate. ``clock`` (seconds) drives the local buckets; tests inject their own."""
        self.settings = settings
        self._redis = redis
        self._clock = clock
        rate_m = settings.quota_messages
        rate_b = settings.quota_bytes
        self.enabled: bool = rate_m > 0 or rate_b > 0
        burst_s = settings.quota_burst_s
        share = 1 if redis is None else settings.quota_replicas
        # A dimension without limit: rate 0, allowance and burst _UNLIMITED, never low.
        self._rate_m = rate_m
        self._rate_b = rate_b
        self._burst_m = rate_m * burst_s if rate_m else _UNLIMITED
        self._burst_b = rate_b * burst_s if rate_b else _UNLIMITED
        self._chunk_m = max(1.0, math.ceil(rate_m * CHUNK_S)) if rate_m else 0.0
        self._chunk_b = max(1.0, math.ceil(rate_b * CHUNK_S)) if rate_b else 0.0
        self._lrate_m = rate_m / share
        self._lrate_b = rate_b / share
        self._lburst_m = self._burst_m / share if rate_m else _UNLIMITED
        self._lburst_b = self._burst_b / share if rate_b else _UNLIMITED
        self._mode = _LOCAL if redis is None else _REDIS
        self._subjects: dict[str, _Subject] = {}
        self._touched: list[_Subject] = []
        self._tick_no = 0
        self._swept = clock()
        self._probed = 0.0
        self._task: asyncio.Task[None] | None = None
        self._rejected = 0
        self._fallback_decisions = 0
        self._grants = 0
        self._slow = 0
        self._last_error = ""
        self._errors: tuple[type[BaseException], ...] = (OSError,)
        self._grant: Any = None
        self._give: Any = None
        if redis is not None:
            from redis.exceptions import RedisError

            self._errors = (RedisError, OSError)  # OSError covers TimeoutError
            self._grant = redis.register_script(_GRANT)
            self._give = redis.register_script(_GIVE)

    # ---- hot path -------------------------------------------------------------------------

    def try_take(self, subject: str, messages: int, nbytes: int) -> bool:
        """Take ``messages`` and ``nbytes`` from the subject's local allowance: True, or False
        with nothing taken (then ``acquire`` decides). Synchronous, no I/O, no logging."""
        s = self._subjects.get(subject)
        if s is None:
            if not self.enabled:
                return True
            s = self._add(subject)
        if not s.touched:
            s.touched = True
            self._touched.append(s)
        if not self._mode:
            if s.m >= messages and s.b >= nbytes:
                s.m -= messages
                s.b -= nbytes
                return True
            return False
        self._refill(s)  # a local bucket
        if s.m >= messages and s.b >= nbytes:
            s.m -= messages
            s.b -= nbytes
            if self._mode == _FALLBACK:
                self._fallback_decisions += 1
            return True
        return False

    def _refill(self, s: _Subject) -> None:
        now = self._clock()
        dt = now - s.stamp
        if dt > 0:
            s.stamp = now
            m = s.m + dt * self._lrate_m
            s.m = m if m < self._lburst_m else self._lburst_m
            b = s.b + dt * self._lrate_b
            s.b = b if b < self._lburst_b else self._lburst_b

    def _add(self, subject: str) -> _Subject:
        if len(self._subjects) >= MAX_SUBJECTS:
            # Dropping the oldest entry loses its allowance: the error is on the safe side.
            del self._subjects[next(iter(self._subjects))]
        if len(self._touched) >= MAX_SUBJECTS:
            self._drain_touched()
        if self._mode == _REDIS:
            m: float = 0 if self._rate_m else _UNLIMITED
            b: float = 0 if self._rate_b else _UNLIMITED
        else:
            m, b = self._lburst_m, self._lburst_b
        s = _Subject(subject, m, b, self._clock(), self._tick_no)
        self._subjects[subject] = s
        return s

    def _drain_touched(self) -> list[_Subject]:
        touched, self._touched = self._touched, []
        for s in touched:
            s.touched = False
            s.seen = self._tick_no
        return touched

    # ---- slow path ------------------------------------------------------------------------

    async def acquire(self, subject: str, messages: int, nbytes: int) -> float:
        """Decide a request ``try_take`` refused: 0.0 when taken, else the Retry-After in
        seconds (> 0). Redis mode: one round trip, shared by concurrent callers of the subject;
        Redis down: the local share decides, and the decision is counted."""
        if not self.enabled:
            return 0.0
        self._slow += 1
        s = self._subjects.get(subject) or self._add(subject)
        if not s.touched:
            s.touched = True
            self._touched.append(s)
        wait = 0.0
        for _ in range(_ROUNDS):
            if self._mode:
                wait = self._decide_local(s, messages, nbytes)
                if self._mode == _FALLBACK:
                    self._fallback_decisions += 1
                break
            if s.m >= messages and s.b >= nbytes:
                s.m -= messages
                s.b -= nbytes
                return 0.0
            fetch = s.fetch
            if fetch is None:
                s.need_m, s.need_b = messages, nbytes
                s.demand_m = s.demand_b = 0
                s.wait = 0.0
                fetch = s.fetch = asyncio.ensure_future(self._fetch(s))
            s.demand_m += messages
            s.demand_b += nbytes
            await asyncio.shield(fetch)
            if s.m >= messages and s.b >= nbytes:
                s.m -= messages
                s.b -= nbytes
                return 0.0
            wait = s.wait
            if wait > 0:
                break
        else:
            # Granted each round, and each time others spent it first: a busy subject.
            wait = max(
                messages / self._rate_m if self._rate_m else 0.0,
                nbytes / self._rate_b if self._rate_b else 0.0,
                CHUNK_S,
            )
        if wait > 0:
            self._rejected += 1
        return wait

    def _decide_local(self, s: _Subject, messages: int, nbytes: int) -> float:
        self._refill(s)
        # A request above the burst passes on a full bucket, which then goes into debt.
        need_m = min(messages, self._lburst_m)
        need_b = min(nbytes, self._lburst_b)
        if s.m >= need_m and s.b >= need_b:
            s.m -= messages
            s.b -= nbytes
            return 0.0
        wait = max(
            (need_m - s.m) / self._lrate_m if s.m < need_m else 0.0,
            (need_b - s.b) / self._lrate_b if s.b < need_b else 0.0,
        )
        return max(wait, 1e-6)

    def _args(
        self, s: _Subject, need_m: float, need_b: float, want_m: float, want_b: float
    ) -> list[Any]:
        """The grant script's arguments for requests totalling ``need`` (the least worth
        granting) and ``want`` (the most), of which ``s`` holds part already."""
        # A dimension without limit goes as rate 0: the script skips it.
        return [
            self._rate_m,
            self._burst_m if self._rate_m else 0,
            max(0, math.ceil(need_m - s.m)) if self._rate_m else 0,
            max(0, math.ceil(want_m - s.m), self._chunk_m) if self._rate_m else 0,
            self._rate_b,
            self._burst_b if self._rate_b else 0,
            max(0, math.ceil(need_b - s.b)) if self._rate_b else 0,
            max(0, math.ceil(want_b - s.b), self._chunk_b) if self._rate_b else 0,
        ]

    async def _fetch(self, s: _Subject) -> None:
        """One grant for the requests waiting on ``s``; runs once they all joined it."""
        try:
            args = self._args(s, s.need_m, s.need_b, s.demand_m, s.demand_b)
            r = await self._bounded(self._grant(keys=[KEY_PREFIX + s.key], args=args))
            self._grants += 1
            self._up()  # (Redis answered a grant sent before it was found down)
            self._credit(s, r, True)
        except self._errors as e:
            self._down(e)
        finally:
            s.fetch = None

    def _credit(self, s: _Subject, r: Any, answer: bool) -> None:
        if self._rate_m:
            s.m += int(r[0])
            s.base_m += int(r[0])
        if self._rate_b:
            s.b += int(r[1])
            s.base_b += int(r[1])
        if answer:
            wait_us = int(r[2])
            s.wait = max(wait_us / 1e6, 1e-6) if wait_us > 0 else 0.0

    # ---- background -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background task (top-ups, idle subjects, Redis probes)."""
        if self._task is not None or not self.enabled:
            return
        if self._redis is not None:
            try:
                await self._bounded(self._redis.ping())
            except self._errors as e:
                self._down(e)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop the background task and give the unspent allowance back to Redis."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._mode == _REDIS and self._subjects:
            subjects = list(self._subjects.values())
            self._subjects.clear()
            with contextlib.suppress(*self._errors):
                await self._give_back(subjects)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("quota reconcile failed")

    async def _tick(self) -> None:
        self._tick_no += 1
        touched = self._drain_touched()
        if self._mode == _REDIS:
            low = []
            for s in touched:
                pace = self._pace(s)
                if pace is not None:
                    low.append((s, *pace))
            for i in range(0, len(low), MAX_PIPELINE):
                await self._top_up(low[i : i + MAX_PIPELINE])
        now = self._clock()
        if now - self._swept >= IDLE_S:
            self._swept = now
            await self._sweep()
        if self._mode == _FALLBACK and now - self._probed >= PROBE_S:
            self._probed = now
            await self._probe()

    def _pace(self, s: _Subject) -> tuple[float, float] | None:
        """What ``s`` spent since the last look, if it would run out within a tick at that
        pace, else None. A subject used once is not topped up: its first grant lasts."""
        low = False
        spent_m = spent_b = 0.0
        if self._rate_m:
            spent_m = s.base_m - s.m
            s.base_m = s.m
            low = s.m < spent_m
        if self._rate_b:
            spent_b = s.base_b - s.b
            s.base_b = s.b
            low = low or s.b < spent_b
        return (spent_m, spent_b) if low else None

    async def _top_up(self, low: list[tuple[_Subject, float, float]]) -> None:
        """A grant for each subject in one pipeline (what it spent during the last tick, at
        least a chunk); the slow path shares it."""
        assert self._redis is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        subjects: list[_Subject] = []
        calls: list[tuple[str, list[Any]]] = []
        for s, spent_m, spent_b in low:
            if s.fetch is None and self._subjects.get(s.key) is s:
                s.fetch = done
                subjects.append(s)
                calls.append((s.key, self._args(s, 0, 0, s.m + spent_m, s.b + spent_b)))
        try:
            if subjects:
                results = await self._bounded(self._pipeline(self._grant, calls))
                self._grants += len(subjects)
                for s, r in zip(subjects, results, strict=True):
                    self._credit(s, r, False)
        except self._errors as e:
            self._down(e)
        finally:
            for s in subjects:
                if s.fetch is done:
                    s.fetch = None
            done.set_result(None)

    async def _sweep(self) -> None:
        """Forget the subjects unused for ``IDLE_S`` (Redis mode: give their allowance back)."""
        idle_ticks = math.ceil(IDLE_S / TICK_S)
        gone: list[_Subject] = []
        for key, s in list(self._subjects.items()):
            if s.touched or s.fetch is not None or self._tick_no - s.seen < idle_ticks:
                continue
            if self._mode:
                # A local bucket is forgotten once full again: a new one is the same.
                self._refill(s)
                if (self._rate_m and s.m < self._lburst_m) or (
                    self._rate_b and s.b < self._lburst_b
                ):
                    continue
            del self._subjects[key]
            gone.append(s)
        if self._mode == _REDIS and gone:
            try:
                await self._give_back(gone)
            except self._errors as e:
                self._down(e)

    async def _give_back(self, subjects: list[_Subject]) -> None:
        assert self._redis is not None
        back = [s for s in subjects if (self._rate_m and s.m >= 1) or (self._rate_b and s.b >= 1)]
        calls: list[tuple[str, list[Any]]] = [
            (
                s.key,
                [
                    self._rate_m,
                    math.floor(s.m) if self._rate_m else 0,
                    self._rate_b,
                    math.floor(s.b) if self._rate_b else 0,
                ],
            )
            for s in back
        ]
        for i in range(0, len(calls), MAX_PIPELINE):
            await self._bounded(self._pipeline(self._give, calls[i : i + MAX_PIPELINE]))

    async def _probe(self) -> None:
        assert self._redis is not None
        try:
            await self._bounded(self._redis.ping())
        except self._errors as e:
            self._last_error = str(e) or type(e).__name__
            return
        self._up()

    # ---- Redis calls and state ------------------------------------------------------------

    async def _pipeline(self, script: Any, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """``script`` once per (subject, args) of ``calls``, in one round trip."""
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            for subject, args in calls:
                await script(keys=[KEY_PREFIX + subject], args=args, client=pipe)
            results: list[Any] = await pipe.execute()
            return results

    @staticmethod
    async def _bounded(call: Awaitable[T]) -> T:
        """``call``'s result within ``REDIS_TIMEOUT_S``, else TimeoutError. Unlike
        ``asyncio.wait_for``, never waits for an abandoned call to unwind: however the client
        handles the cancellation, the slow path and the background task go on."""
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait((task,), timeout=REDIS_TIMEOUT_S)
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_ignore_outcome)
        if not task.done():
            raise TimeoutError(f"no answer from redis within {REDIS_TIMEOUT_S} s")
        return task.result()

    def _down(self, e: BaseException) -> None:
        self._last_error = str(e) or type(e).__name__
        if self._mode != _REDIS:
            return
        self._mode = _FALLBACK
        now = self._clock()
        self._probed = now
        # Each subject starts on a full bucket of the share (cluster-wide, at most one burst
        # more): the requests that waited for Redis to time out are decided on it at once.
        for s in self._subjects.values():
            s.m = self._lburst_m
            s.b = self._lburst_b
            s.stamp = now
        log.error(
            "redis unreachable: produce quotas are enforced locally at 1/%d of the limit "
            "(MESSAGE_QUEUE_QUOTA_REPLICAS) until it is back",
            self.settings.quota_replicas,
            extra={"redis": self._where(), "error": self._last_error},
        )

    def _up(self) -> None:
        if self._mode != _FALLBACK:
            return
        self._mode = _REDIS
        # Local buckets are not Redis's grants: start again from what Redis grants.
        for s in self._subjects.values():
            s.m = s.base_m = 0 if self._rate_m else _UNLIMITED
            s.b = s.base_b = 0 if self._rate_b else _UNLIMITED
        log.info(
            "redis reachable again: produce quotas are cluster-wide again",
            extra={"redis": self._where()},
        )

    def _where(self) -> str:
        return f"{self.settings.redis_host}:{self.settings.redis_port}"

    def stats(self) -> dict[str, float]:
        """Counters for the metrics collector: ``rejected`` (acquire answered a Retry-After),
        ``redis_fallback`` (decisions made on the local share while Redis was down),
        ``redis_down`` (0 or 1), ``grants`` (grant scripts run), ``slow_path`` (acquire
        calls), ``subjects`` (kept locally)."""
        return {
            "rejected": float(self._rejected),
            "redis_fallback": float(self._fallback_decisions),
            "redis_down": 1.0 if self._mode == _FALLBACK else 0.0,
            "grants": float(self._grants),
            "slow_path": float(self._slow),
            "subjects": float(len(self._subjects)),
        }

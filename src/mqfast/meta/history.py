"""Metric history: the ``GET /api/v1/metrics`` query, the recorder that feeds the store, and
the row form in which both stores keep and aggregate points (``point_params``, ``point_from_row``).

Every gateway process runs one ``HistoryRecorder``. Its ticks are aligned to wall-clock multiples
of the interval, so that the points of all processes for one interval carry the same start time
and the store can aggregate them; a process's contribution is the delta of its own cumulative
counters since its previous sample.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import unquote_to_bytes

import msgspec

from mqfast._core import topic_name_error
from mqfast.config import parse_duration
from mqfast.errors import InvalidQuery
from mqfast.groups import now_ms
from mqfast.messages import MetricPoint
from mqfast.meta import MetaStore
from mqfast.meta.common import cancel_and_wait

__all__ = [
    "HistoryRecorder",
    "MetricsQuery",
    "TopicSample",
    "format_rfc3339",
    "parse_metrics_query",
    "parse_rfc3339",
    "point_from_row",
    "point_params",
]

log = logging.getLogger("mqfast.history")

DEFAULT_RANGE_MS: Final = 3_600_000
# Points per topic a query answers without a ``step`` (Grafana asks about as many for a panel).
MAX_POINTS_PER_TOPIC: Final = 1000
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_MS: Final = dt.timedelta(milliseconds=1)
# The instants RFC 3339 can write (four-digit years), in UTC: what is parsed stays formattable.
_MIN_MS: Final = (dt.datetime(1, 1, 1, tzinfo=dt.UTC) - _EPOCH) // _ONE_MS
_MAX_MS: Final = (dt.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=dt.UTC) - _EPOCH) // _ONE_MS
_PARAMS: Final = ("start_time", "end_time", "topic", "step")
# RFC 3339 section 5.6; lower-case "t"/"z" and a space separator are allowed by its notes.
_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def parse_rfc3339(text: str) -> int:
    """Unix milliseconds of an RFC 3339 timestamp (``Z`` or ``±hh:mm``, optional fraction).

    Digits of the fraction beyond milliseconds are truncated. Raises ``ValueError``.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp such as 2024-01-01T00:00:00Z")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    if second == 60:  # a leap second; Unix time has none, so it is the next second's start
        second = 59
        leap_ms = 1000
    else:
        leap_ms = 0
    offset = dt.timedelta(0)
    if m.group(8) is None:
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise ValueError(f"{text!r} has an invalid UTC offset")
        offset = dt.timedelta(hours=oh, minutes=om)
        if m.group(9) == "-":
            offset = -offset
    try:
        when = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.timezone(offset))
    except ValueError as e:
        raise ValueError(f"{text!r} is not a valid date and time: {e}") from None
    frac = m.group(7) or ""
    frac_ms = int(frac[:3].ljust(3, "0")) if frac else 0
    ms = (when - _EPOCH) // _ONE_MS + frac_ms + leap_ms
    if not _MIN_MS <= ms <= _MAX_MS:  # e.g. 0001-01-01T00:00:00+01:00 is in year 0 in UTC
        raise ValueError(f"{text!r} is outside the years 0001 to 9999 in UTC")
    return ms


def format_rfc3339(ms: int) -> str:
    """``ms`` (Unix milliseconds) as RFC 3339 UTC, always with milliseconds and ``Z``.

    One fixed width keeps the strings in time order when sorted as text.
    """
    when = _EPOCH + dt.timedelta(milliseconds=ms)
    # %Y does not pad years before 1000 to four digits
    return f"{when.year:04d}-{when:%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def parse_audit_query(query: bytes, now_ms: int) -> tuple[int, int, int]:
    """``GET /api/v1/audit``: ``start_time``/``end_time`` (RFC 3339, default the last hour) and
    ``limit`` (1-10000, default 1000); ``InvalidQuery`` naming the parameter at fault."""
    values = _query_values(query, ("start_time", "end_time", "limit"))
    end_ms = _parse_time(values, "end_time", now_ms)
    start_ms = _parse_time(values, "start_time", end_ms - DEFAULT_RANGE_MS)
    if end_ms < start_ms:
        raise InvalidQuery("end_time is before start_time", field="end_time")
    text = values.get("limit", "1000")
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise InvalidQuery(f"limit must be an integer from 1 to 10000, got {text!r}", field="limit")
    return start_ms, end_ms, int(text)


def _query_values(query: bytes, allowed: tuple[str, ...]) -> dict[str, str]:
    values: dict[str, str] = {}
    for segment in query.split(b"&"):
        if not segment:
            continue
        raw_name, _, raw_value = segment.partition(b"=")
        name = _unquote(raw_name, None)
        value = _unquote(raw_value, name)
        if name not in allowed:
            raise InvalidQuery(
                f"unknown query parameter {name!r} (allowed: {', '.join(allowed)})", field=name
            )
        if name in values:
            raise InvalidQuery(f"query parameter {name!r} is given more than once", field=name)
        values[name] = value
    return values


class MetricsQuery(msgspec.Struct, frozen=True):
    """A parsed ``GET /api/v1/metrics``: the range, the topic filter and the step."""

    start_ms: int
    end_ms: int
    topic: str | None
    step_ms: int  # width of one answered point; a multiple of it starts each point


def parse_metrics_query(
    query: bytes, now_ms: int, interval_ms: int, max_points: int = MAX_POINTS_PER_TOPIC
) -> MetricsQuery:
    """Parse the raw query string of ``GET /api/v1/metrics``.

    Parameters: ``start_time`` and ``end_time`` (RFC 3339; defaults: ``end = now``,
    ``start = end - 1h``), ``topic`` and ``step`` (a duration such as ``"5m"`` or integer
    nanoseconds, at least the recording interval ``interval_ms``; default: the smallest multiple
    of the interval that answers at most ``max_points`` points per topic, so that any range can
    be asked for, as in a Prometheus range query). Raises ``InvalidQuery`` naming the parameter
    at fault for an unknown or repeated parameter, an unparseable time or step, ``end_time``
    before ``start_time``, a step below the interval or an invalid topic name.
    """
    values = _query_values(query, tuple(_PARAMS))
    end_ms = _parse_time(values, "end_time", now_ms)
    start_ms = _parse_time(values, "start_time", end_ms - DEFAULT_RANGE_MS)
    if end_ms < start_ms:
        raise InvalidQuery("end_time is before start_time", field="end_time")
    text = values.get("step")
    if text is None:
        step_ms = interval_ms * max(1, -(-(end_ms - start_ms) // (interval_ms * max_points)))
    else:
        try:
            step_ms = parse_duration(text, "step") // 1_000_000
        except ValueError as e:
            raise InvalidQuery(str(e), field="step") from None
        if step_ms < interval_ms:
            raise InvalidQuery(
                f"step {text!r} is shorter than the recording interval of {interval_ms} ms"
                " (a bare integer is nanoseconds; write e.g. '10s', '5m', '1h')",
                field="step",
            )

    topic = values.get("topic")
    if topic is not None:
        reason = topic_name_error(topic)
        if reason is not None:
            raise InvalidQuery(f"invalid topic: {reason}", field="topic")
    return MetricsQuery(start_ms, end_ms, topic, step_ms)


def _unquote(raw: bytes, field: str | None) -> str:
    # "+" is kept literally rather than read as a space: no valid value contains a space, and
    # clients often leave the "+" of a UTC offset ("...T00:00:00+02:00") unescaped.
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        what = f"the value of {field!r}" if field else "a parameter name"
        raise InvalidQuery(f"{what} is not valid percent-encoded UTF-8", field=field) from None


def _parse_time(values: dict[str, str], name: str, default: int) -> int:
    text = values.get(name)
    if text is None:  # the default start is end - 1h, which must not fall before year 1
        return max(default, _MIN_MS)
    try:
        return parse_rfc3339(text)
    except ValueError as e:
        raise InvalidQuery(f"invalid {name}: {e}", field=name) from None


# -- the stores' row form ------------------------------------------------------------------


def point_params(p: MetricPoint, worker: str) -> tuple[Any, ...]:
    """The values of one point of ``worker`` for the stores' insert, in their column order:
    ``ts_ms, topic, worker, interval_s, produced, ..., error_rate, retry_rate``.

    Raises ``ValueError`` when ``p.time`` is not RFC 3339.
    """
    return (
        parse_rfc3339(p.time),
        p.topic,
        worker,
        float(p.interval_s),
        p.produced,
        p.consumed,
        p.expired,
        p.failed,
        p.retried,
        p.queue_size,
        p.dead_letter_size,
        float(p.processing_avg_ms),
        float(p.processing_p95_ms),
        float(p.processing_p99_ms),
        p.active_consumers,
        p.total_consumers,
        float(p.error_rate),
        float(p.retry_rate),
    )


def point_from_row(r: Any) -> MetricPoint:
    """One row of the stores' query that aggregates the points of a step (the workers of every
    interval in it) and topic: ``step start, topic, width in seconds``, the five counters summed,
    the two sizes' maximum, ``SUM(processing_avg_ms * consumed)``,
    ``AVG(NULLIF(processing_avg_ms, 0))``, then the percentiles' and the consumer counts'
    maximum. Rates are recomputed from the sums."""
    consumed = int(r[4])
    failed = int(r[6])
    retried = int(r[7])
    if consumed > 0:
        avg = float(r[10]) / consumed
    else:  # no weights: the plain mean of the workers that timed something
        avg = float(r[11] or 0.0)
    return MetricPoint(
        time=format_rfc3339(int(r[0])),
        topic=r[1],
        interval_s=float(r[2]),
        produced=int(r[3]),
        consumed=consumed,
        expired=int(r[5]),
        failed=failed,
        retried=retried,
        queue_size=int(r[8]),
        dead_letter_size=int(r[9]),
        processing_avg_ms=avg,
        processing_p95_ms=float(r[12]),
        processing_p99_ms=float(r[13]),
        active_consumers=int(r[14]),
        total_consumers=int(r[15]),
        error_rate=failed / consumed if consumed else 0.0,
        retry_rate=retried / consumed if consumed else 0.0,
    )


# -- recorder ------------------------------------------------------------------------------


class TopicSample(msgspec.Struct):
    """One process's view of one topic at one instant.

    Counters are cumulative since the process started (the recorder takes deltas); gauges are
    current values; ``processing_ms`` holds the processing times (lease to acknowledgement)
    observed since the previous sample.
    """

    produced: int = 0
    consumed: int = 0
    expired: int = 0
    failed: int = 0
    retried: int = 0
    queue_size: int = 0
    dead_letter_size: int = 0
    active_consumers: int = 0
    total_consumers: int = 0
    processing_ms: list[float] = msgspec.field(default_factory=list)


SampleFn = Callable[[], Awaitable[dict[str, TopicSample]]]


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class HistoryRecorder:
    """Writes one ``MetricPoint`` per topic per interval to ``store`` (see the module docstring).

    ``start()`` takes the baseline sample at once and then ticks at every wall-clock multiple of
    ``interval_s``; a tick's point is labelled with the start of the interval it ends. Points
    forced by ``record_now`` are labelled with the interval in progress, and the store merges
    them with that interval's scheduled point.
    """

    def __init__(
        self,
        store: MetaStore,
        sample: SampleFn,
        interval_s: float,
        worker: str,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.store = store
        self.sample = sample
        self.interval_s = interval_s
        self.worker = worker
        self._interval_ms = max(1, round(interval_s * 1000))
        self._last: dict[str, tuple[int, ...]] | None = None  # counters per topic; None: no base
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failures = 0  # consecutive failed ticks, so a streak is logged once

    def start(self) -> None:
        """Start the background task on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="mqfast-history-recorder"
            )

    async def stop(self) -> None:
        """Stop the background task; the interval in progress is not recorded."""
        task, self._task = self._task, None
        self._stopping = True  # a cancellation lost inside a library still ends the loop
        await cancel_and_wait(task)

    async def record_now(self) -> None:
        """Take one sample now and record its deltas (the first sample is only the baseline)."""
        await self._tick(self._bucket_of(now_ms()))

    async def _run(self) -> None:
        if self._last is None:
            await self._tick(None)  # baseline
        while not self._stopping:
            now = now_ms()
            boundary = self._bucket_of(now) + self._interval_ms
            # The label is fixed before sleeping, so a wake-up a little early or late (the loop
            # sleeps on the monotonic clock) still names the right interval.
            await asyncio.sleep((boundary - now) / 1000)
            await self._tick(boundary - self._interval_ms)

    def _bucket_of(self, ms: int) -> int:
        return ms - ms % self._interval_ms

    async def _tick(self, label_ms: int | None) -> None:
        async with self._lock:
            try:
                samples = await self.sample()
                points = self._points(samples, label_ms)
                if points:
                    await self.store.record_points(points, self.worker)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._failures += 1
                if self._failures == 1:
                    log.exception(
                        "metric history: recording failed; retrying every interval",
                        extra={"worker": self.worker},
                    )
                return
            if self._failures:
                log.info(
                    "metric history: recording works again after %d failed intervals",
                    self._failures,
                    extra={"worker": self.worker},
                )
                self._failures = 0

    def _points(self, samples: dict[str, TopicSample], label_ms: int | None) -> list[MetricPoint]:
        """Deltas against the previous sample; advances the baseline."""
        first = self._last is None
        if self._last is None:
            self._last = {}
        last = self._last
        points: list[MetricPoint] = []
        time_text = format_rfc3339(label_ms) if label_ms is not None else ""
        for topic, s in sorted(samples.items()):
            now = (s.produced, s.consumed, s.expired, s.failed, s.retried)
            before = last.get(topic)
            last[topic] = now
            if first or label_ms is None:
                continue
            # A counter below its previous value means the source restarted from zero.
            if before is None:
                before = (0, 0, 0, 0, 0)
            produced, consumed, expired, failed, retried = (
                c - p if c >= p else c for c, p in zip(now, before, strict=True)
            )
            ordered = sorted(s.processing_ms)
            points.append(
                MetricPoint(
                    time=time_text,
                    topic=topic,
                    interval_s=self.interval_s,
                    produced=produced,
                    consumed=consumed,
                    expired=expired,
                    failed=failed,
                    retried=retried,
                    queue_size=s.queue_size,
                    dead_letter_size=s.dead_letter_size,
                    processing_avg_ms=sum(ordered) / len(ordered) if ordered else 0.0,
                    processing_p95_ms=_percentile(ordered, 0.95) if ordered else 0.0,
                    processing_p99_ms=_percentile(ordered, 0.99) if ordered else 0.0,
                    active_consumers=s.active_consumers,
                    total_consumers=s.total_consumers,
                    error_rate=failed / consumed if consumed else 0.0,
                    retry_rate=retried / consumed if consumed else 0.0,
                )
            )
        return points

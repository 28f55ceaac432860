"""Prometheus exposition of the core's counters, served at ``/metrics`` on METRICS_ADDR.

The hot path only bumps C counters; :class:`StatsCollector` turns one ``stats()`` snapshot into
metric families at scrape time, so nothing in this module runs per request. Metric names are the
contract's (``message_queue_*``); labels are route templates and topic names, never raw paths.

With ``--workers N`` the supervisor serves METRICS_ADDR: at each scrape it asks every worker for
its families (:func:`encode_families`) and :class:`PodMetrics` merges them into one exposition
(:func:`merge_families`, the rules in :data:`POD_GAUGES`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mqfast.debug import gc_pause_totals
from mqfast.side import Response, serve_side

__all__ = [
    "POD_GAUGES",
    "PREFIX",
    "WORKER_LABEL",
    "Family",
    "PodMetrics",
    "StatsCollector",
    "build_registry",
    "decode_families",
    "encode_families",
    "merge_families",
    "start_metrics_server",
]

PREFIX = "message_queue_"
Snapshot = Callable[[], Mapping[str, Any]]
Extra = Callable[[], Mapping[str, float]]
Levels = Callable[[], Mapping[str, Any]]
STATUSES = ("ok", "degraded", "down")

_GAUGES = (
    ("connections", "http_connections", "Open client HTTP connections."),
    ("inflight", "inflight_messages", "Messages accepted and awaiting their delivery report."),
    ("engine_queue", "engine_queue_depth", "Messages queued inside the storage engine."),
)
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


class StatsCollector:
    """A prometheus_client collector reading ``snapshot()`` (the core's ``stats()``) per scrape.

    ``extra()`` supplies gauges owned by other parts: ``"active_consumers"`` becomes
    ``message_queue_active_consumers`` (0 when absent) and any other key ``k`` becomes
    ``message_queue_<k>``. Every contract metric family is exported even when it has no series.
    ``levels()`` (``App.metric_levels``) supplies the health and per-group gauges.
    """

    def __init__(
        self, snapshot: Snapshot, extra: Extra | None = None, levels: Levels | None = None
    ) -> None:
        self._snapshot = snapshot
        self._extra = extra
        self._levels = levels

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of one snapshot."""
        snap = self._snapshot()
        yield from _topic_families(snap.get("topics") or {})
        yield _consumed_family(snap.get("consumed") or {})
        yield from _route_families(snap.get("latency_buckets") or (), snap.get("routes") or {})
        for key, name, doc in _GAUGES:
            yield GaugeMetricFamily(PREFIX + name, doc, value=float(snap.get(key, 0) or 0))
        yield from _extra_families(dict(self._extra()) if self._extra is not None else {})
        count, pause_s = gc_pause_totals()
        yield CounterMetricFamily(
            PREFIX + "gc_pauses", "Garbage collections whose pause was measured.", value=count
        )
        yield CounterMetricFamily(
            PREFIX + "gc_pause_seconds",
            "Time the process stood still in garbage collections.",
            value=pause_s,
        )
        if self._levels is not None:
            yield from _level_families(self._levels())


def _topic_families(topics: Mapping[str, Mapping[str, int]]) -> Iterator[Metric]:
    produced = CounterMetricFamily(
        PREFIX + "messages_produced", "Messages durably produced.", labels=["topic"]
    )
    failed = CounterMetricFamily(
        PREFIX + "messages_failed",
        "Failed produces plus failed deliveries (negative acknowledgements, expired leases).",
        labels=["topic"],
    )
    nbytes = CounterMetricFamily(
        PREFIX + "produced_bytes", "Payload bytes durably produced.", labels=["topic"]
    )
    expired = CounterMetricFamily(
        PREFIX + "messages_expired", "Messages past their TTL, never delivered.", labels=["topic"]
    )
    dead = CounterMetricFamily(
        PREFIX + "messages_dead_lettered",
        "Messages moved to <topic>.dlq (delivery limit reached, or expired).",
        labels=["topic"],
    )
    retried = CounterMetricFamily(
        PREFIX + "messages_redelivered", "Deliveries after the first one.", labels=["topic"]
    )
    for topic, t in sorted(topics.items()):
        produced.add_metric([topic], t.get("produced", 0))
        failed.add_metric([topic], t.get("failed", 0))
        nbytes.add_metric([topic], t.get("bytes", 0))
        expired.add_metric([topic], t.get("expired", 0))
        dead.add_metric([topic], t.get("dead_lettered", 0))
        retried.add_metric([topic], t.get("retried", 0))
    yield produced
    yield failed
    yield nbytes
    yield expired
    yield dead
    yield retried


def _consumed_family(consumed: Mapping[Any, int]) -> Metric:
    fam = CounterMetricFamily(
        PREFIX + "messages_consumed",
        "Messages delivered to consumers.",
        labels=["topic", "group"],
    )
    for key, n in sorted(consumed.items()):
        topic, group = key
        fam.add_metric([str(topic), str(group)], n)
    return fam


def _route_families(bounds: Any, routes: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
    les = [repr(float(b)) for b in bounds]
    latency = HistogramMetricFamily(
        PREFIX + "processing_latency_seconds",
        "Time from a request's arrival to its response, by route template.",
        labels=["route", "method"],
    )
    requests = CounterMetricFamily(
        PREFIX + "http_requests",
        "HTTP responses by route template, method and status code.",
        labels=["route", "method", "code"],
    )
    for route, r in sorted(routes.items()):
        method = str(r.get("method", ""))
        counts = list(r.get("counts") or ())
        # The core keeps one count per bucket (cheaper to bump); Prometheus wants running totals.
        # The +Inf bucket is the grand total, which also tolerates a core that omits it.
        buckets: list[tuple[str, float]] = []
        running = 0
        for le, c in zip(les, counts, strict=False):
            running += c
            buckets.append((le, running))
        buckets.append(("+Inf", sum(counts)))
        latency.add_metric([route, method], buckets, float(r.get("sum_s", 0.0)))
        for code, n in sorted((r.get("status") or {}).items()):
            requests.add_metric([route, method, str(code)], n)
    yield latency
    yield requests


def _extra_families(extra: dict[str, float]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        PREFIX + "active_consumers",
        "Consumers that polled or heartbeated recently.",
        value=float(extra.pop("active_consumers", 0)),
    )
    reserved = {PREFIX + name for _, name, _ in _GAUGES}
    for key, value in sorted(extra.items()):
        name = PREFIX + _NAME_OK.sub("_", key)
        if name in reserved:
            continue  # a part must not shadow a core gauge with a second family of that name
        yield GaugeMetricFamily(name, f"Gauge {key!r} reported by another part.", value=value)


def _level_families(levels: Mapping[str, Any]) -> Iterator[Metric]:
    status = GaugeMetricFamily(
        PREFIX + "health_status",
        "1 for the status /health reports now (ok, degraded or down), 0 for the others.",
        labels=["status"],
    )
    for s in STATUSES:
        status.add_metric([s], 1.0 if levels.get("status") == s else 0.0)
    yield status
    up = GaugeMetricFamily(
        PREFIX + "health_check_up",
        "1 when the /health check (engine, postgres, redis) answers up, else 0.",
        labels=["check"],
    )
    for name, ok in sorted((levels.get("checks") or {}).items()):
        up.add_metric([name], 1.0 if ok else 0.0)
    yield up
    lag = GaugeMetricFamily(
        PREFIX + "consumer_group_lag",
        "Messages of the topic the group has not completed (at the last sample).",
        labels=["group", "topic"],
    )
    age = GaugeMetricFamily(
        PREFIX + "oldest_unacked_age_seconds",
        "Age of the group's oldest delivery not acknowledged yet; absent when none is.",
        labels=["group", "topic"],
    )
    for group, topic, n, age_s in sorted(levels.get("groups") or ()):
        lag.add_metric([group, topic], n)
        if age_s is not None:
            age.add_metric([group, topic], age_s)
    yield lag
    yield age
    dead = GaugeMetricFamily(
        PREFIX + "dead_letter_messages",
        "Messages in <topic>.dlq (at the last sample).",
        labels=["topic"],
    )
    for topic, n in sorted((levels.get("dead_letters") or {}).items()):
        dead.add_metric([topic], n)
    yield dead


def build_registry(
    snapshot: Snapshot, extra: Extra | None = None, levels: Levels | None = None
) -> CollectorRegistry:
    """A fresh registry with the stats collector plus process, platform and GC collectors.

    A private registry (not prometheus_client's global one) so that tests and several gateways
    in one process do not see each other's metrics.
    """
    registry = CollectorRegistry()
    registry.register(StatsCollector(snapshot, extra, levels))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


async def start_metrics_server(
    host: str,
    port: int,
    registry: CollectorRegistry,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> asyncio.Server:
    """Serve ``GET /metrics`` (Prometheus text format 0.0.4) on ``host:port``; ``refresh()`` is
    awaited before each rendering (the supervisor gathers its workers' families there)."""

    async def metrics(query: dict[str, str]) -> Response:
        if refresh is not None:
            await refresh()
        # Rendered on the loop thread on purpose: the snapshot reads counters the loop owns, and
        # a scrape costs about a millisecond every few seconds.
        return 200, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(registry)

    return await serve_side(host, port, {"/metrics": metrics}, name="metrics")


# ---- one endpoint for several workers ------------------------------------------------------

Sample = tuple[str, dict[str, str], float]
Family = tuple[str, str, str, str, list[Sample]]
"""A metric family as a worker sends it: name, help, type, unit, samples (name, labels, value)."""

WORKER_LABEL = "worker"
POD_GAUGES: dict[str, str] = {
    # Per worker: how evenly SO_REUSEPORT spreads the connections is worth seeing.
    PREFIX + "http_connections": "worker",
    PREFIX + "inflight_messages": "sum",
    PREFIX + "engine_queue_depth": "sum",
    # Every worker reads these from the same store; they differ only by when they looked.
    PREFIX + "active_consumers": "max",
    PREFIX + "consumer_group_lag": "max",
    PREFIX + "oldest_unacked_age_seconds": "max",
    PREFIX + "dead_letter_messages": "max",
    # The pod is as healthy as its least healthy worker.
    PREFIX + "health_status": "worst",
    PREFIX + "health_check_up": "min",
}
"""How the pod's exposition combines one gauge of several workers: ``sum``, ``max``, ``min``,
``worst`` (a one-hot status: the worst one any worker reports) or ``worker`` (one series per
worker, labelled ``worker="<index>"``: the default for a gauge not named here, as neither a sum
nor a maximum is right for every gauge). Counters and histograms are summed; ``process_*`` and
``python_*`` families (CPU, memory, file descriptors, the interpreter's GC) are per worker."""

_FAMILIES = msgspec.msgpack.Decoder(list[tuple[str, str, str, str, list[Sample]]])


def pod_rule(name: str, typ: str) -> str:
    """The rule that combines family ``name`` of type ``typ`` over workers (see POD_GAUGES)."""
    if name.startswith(("process_", "python_")):
        return "worker"
    if typ != "gauge":
        return "sum"
    return POD_GAUGES.get(name, "worker")


def families_of(collector: Collector) -> list[Family]:
    """What ``collector`` (a registry too) collects now, as plain tuples."""
    return [
        (m.name, m.documentation, m.type, m.unit, [(s.name, s.labels, s.value) for s in m.samples])
        for m in collector.collect()
    ]


def encode_families(registry: CollectorRegistry) -> bytes:
    """A worker's answer to the supervisor's scrape: every family, msgpack-encoded."""
    return msgspec.msgpack.encode(families_of(registry))


def decode_families(data: bytes) -> list[Family]:
    """The families :func:`encode_families` encoded."""
    return _FAMILIES.decode(data)


def merge_families(sources: Sequence[tuple[str, Sequence[Family]]]) -> list[Family]:
    """The families of several ``(worker label, families)`` merged by :func:`pod_rule`, in the
    order they first appear. Families without samples are kept (the contract's are always
    exported)."""
    merged: dict[str, tuple[Family, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for worker, families in sources:
        for family in families:
            name, _, typ, _, samples = family
            rule = pod_rule(name, typ)
            values = merged.setdefault(name, (family, {}))[1]
            for sample, labels, value in samples:
                if rule == "worker":
                    labels = {**labels, WORKER_LABEL: worker}
                key = (sample, tuple(labels.items()))
                old = values.get(key)
                if old is None:
                    values[key] = value
                elif rule == "sum":
                    values[key] = old + value
                elif rule == "min":
                    values[key] = min(old, value)
                else:
                    values[key] = max(old, value)
    out: list[Family] = []
    for (name, doc, typ, unit, _), values in merged.values():
        samples = [(sample, dict(labels), value) for (sample, labels), value in values.items()]
        if pod_rule(name, typ) == "worst":
            samples = _worst_only(samples)
        out.append((name, doc, typ, unit, samples))
    return out


def _worst_only(samples: list[Sample]) -> list[Sample]:
    # After "max" every status some worker reports is 1; the pod's is the worst of them.
    on = [labels.get("status", "") for _, labels, value in samples if value]
    worst = max(on, key=lambda s: STATUSES.index(s) if s in STATUSES else -1, default=None)
    return [(s, labels, 1.0 if labels.get("status") == worst else 0.0) for s, labels, _ in samples]


class PodMetrics:
    """The supervisor's collector: its workers' families merged into one exposition.

    :meth:`update` stores a worker's latest answer; a worker that does not answer a scrape
    keeps contributing its previous one. When a worker exits, :meth:`retire` keeps what it had
    counted (counters and histograms, as of its last answer) in the pod's totals, so that a
    restart does not make them go down; its gauges go with it. What it counted after its last
    answer is lost. The supervisor's own ``process_*`` series carry ``worker="supervisor"``, and
    ``message_queue_worker_restarts_total`` counts the workers it restarted.
    """

    def __init__(self) -> None:
        self.restarts = 0
        self._live: dict[int, tuple[int, list[Family]]] = {}  # pid -> (index, last answer)
        self._retired: list[Family] = []
        self._own = ProcessCollector(registry=None)

    def add(self, pid: int, index: int) -> None:
        """A worker started: ``pid`` serves as worker ``index`` until :meth:`retire`."""
        self._live[pid] = (index, [])

    def update(self, pid: int, families: list[Family]) -> None:
        """Worker ``pid`` answered a scrape (ignored once it is retired)."""
        if pid in self._live:
            self._live[pid] = (self._live[pid][0], families)

    def retire(self, pid: int) -> None:
        """Worker ``pid`` exited: fold its counters and histograms into the retired totals."""
        gone = self._live.pop(pid, None)
        if gone is not None:
            kept = merge_families([("", self._retired), (str(gone[0]), gone[1])])
            self._retired = [f for f in kept if pod_rule(f[0], f[2]) == "sum"]

    def describe(self) -> list[Metric]:
        # Nothing to check at registration: the families are whatever the workers send.
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the merged families of the workers' last answers."""
        sources: list[tuple[str, Sequence[Family]]] = [("", self._retired)]
        sources += [(str(i), f) for i, f in sorted(self._live.values(), key=lambda x: x[0])]
        sources.append(("supervisor", families_of(self._own)))
        for name, doc, typ, unit, samples in merge_families(sources):
            metric = Metric(name, doc, typ, unit)
            for sample, labels, value in samples:
                metric.add_sample(sample, labels, value)
            yield metric
        yield CounterMetricFamily(
            PREFIX + "worker_restarts",
            "Workers the supervisor restarted after they exited unexpectedly.",
            value=self.restarts,
        )

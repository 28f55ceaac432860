"""Schemathesis hooks for ``test_schemathesis.py`` (loaded through ``SCHEMATHESIS_HOOKS``).

The OpenAPI document states in prose some rules that JSON Schema cannot express; a request
generated from the schema alone may break them and is then refused with a 400 naming the field,
which the ``positive_data_acceptance`` check would report as a valid request refused. Each rule
is applied here to the generated request before it is sent, only where the value already is
of the documented form (so that a value meant to be invalid stays invalid):

- integers are written without a fraction: JSON Schema counts ``9.0`` as an integer, the
  gateway's decoders do not (documented in the document's ``info.description``);
- durations are at most ten years and some have per-field bounds (``visibility_timeout`` 1 ms
  to 12 h, ``requeue_delay`` at most 100 x MESSAGE_QUEUE_RETRY_BACKOFF_MAX), which a pattern
  over "1h30m" cannot state; a long-poll ``timeout`` is cut to a few milliseconds so that the
  run stays within its budget;
- ``start_time`` is not after ``end_time`` (a relation between two parameters);
- ``replication`` is 1: the embedded engine has one node, the tests' Kafka one broker
  (documented on the field);
- a GET /api/v1/metrics ``step`` is at least the recording interval (1 s in the tests) and
  wide enough that the range holds at most 1,000 points per topic (a relation between three
  parameters and a setting);
- an idempotency key (the ``Idempotency-Key`` header, a batch message's ``idempotency_key``)
  is new for each request: the same key with another body is a 422 by design (a relation
  between requests, which no schema states).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import MutableMapping
from typing import Any

import schemathesis
from schemathesis import Case, HookContext

from mqfast.config import parse_duration
from mqfast.meta.history import format_rfc3339, parse_rfc3339

NS_PER_MS = 1_000_000
TEN_YEARS_MS = 315_360_000_000
# field -> (smallest, largest) accepted, in ms; the largest is within every test's settings.
DURATION_BOUNDS: dict[str, tuple[int, int]] = {
    "timeout": (0, 20),
    "visibility_timeout": (1, 12 * 3600 * 1000),
    "requeue_delay": (0, 1000),
    "ttl": (0, TEN_YEARS_MS),
    "retention": (0, TEN_YEARS_MS),
}
METRICS_INTERVAL_MS = 1000  # MESSAGE_QUEUE_METRICS_INTERVAL of the conformance servers
MAX_POINTS_PER_TOPIC = 1000


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _bounded_durations(value: Any, positive: bool) -> Any:
    if isinstance(value, list):
        return [_bounded_durations(v, positive) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        bounds = DURATION_BOUNDS.get(key)
        if bounds is not None and isinstance(v, int | str) and not isinstance(v, bool):
            out[key] = _bounded(v, key, bounds, positive)
        else:
            out[key] = _bounded_durations(v, positive)
    return out


def _bounded(value: int | str, key: str, bounds: tuple[int, int], positive: bool) -> int | str:
    low, high = bounds
    try:
        ms = parse_duration(value, key) // NS_PER_MS
    except ValueError:
        # Schema-valid but refused: longer than ten years, which the pattern cannot say. In a
        # negative case the value is meant to be refused: left as it is.
        return f"{high}ms" if positive else value
    return value if low <= ms <= high else f"{min(max(ms, low), high)}ms"


def _ordered_times(query: dict[str, Any]) -> None:
    try:
        start, end = parse_rfc3339(query["start_time"]), parse_rfc3339(query["end_time"])
    except (KeyError, TypeError, ValueError):
        return
    if start > end:
        query["start_time"], query["end_time"] = query["end_time"], query["start_time"]


def _metrics_step(query: dict[str, Any]) -> None:
    if not isinstance(query.get("step"), str):
        return
    try:
        end = parse_rfc3339(query.get("end_time") or format_rfc3339(time.time_ns() // NS_PER_MS))
    except (TypeError, ValueError):
        return
    try:
        step_ms = parse_duration(query["step"], "step") // NS_PER_MS
    except ValueError:
        step_ms = -1  # of the documented form but over ten years
    try:
        start = parse_rfc3339(query["start_time"])
    except (KeyError, TypeError, ValueError):
        start = end - 3_600_000
    wide = max(step_ms, METRICS_INTERVAL_MS, -(-(end - start) // MAX_POINTS_PER_TOPIC))
    wide = min(wide, TEN_YEARS_MS)
    if wide != step_ms:
        query["step"] = f"{wide}ms"


_keys = itertools.count()
_RUN = uuid.uuid4().hex[:8]


def _fresh_keys(case: Case, kwargs: dict[str, Any]) -> None:
    for headers in (case.headers, kwargs.get("headers")):
        if isinstance(headers, MutableMapping):
            for name in list(headers):
                if name.lower() == "idempotency-key":
                    headers[name] = f"st-{_RUN}-{next(_keys)}"
    if isinstance(case.body, dict) and isinstance(case.body.get("messages"), list):
        for m in case.body["messages"]:
            if isinstance(m, dict) and isinstance(m.get("idempotency_key"), str):
                m["idempotency_key"] = f"st-{_RUN}-{next(_keys)}"


def _documented(
    context: HookContext, case: Case, positive: bool, kwargs: dict[str, Any] | None = None
) -> Case:
    if isinstance(case.body, dict | list):
        # integers first: 304250263527210.0 is a duration too, once written as an integer
        case.body = _bounded_durations(_integral(case.body) if positive else case.body, positive)
    if not positive:
        return case
    _fresh_keys(case, kwargs or {})
    label = context.operation.label if context.operation is not None else ""
    if isinstance(case.body, dict | list):
        if label == "POST /api/v1/topics" and "replication" in case.body:
            case.body["replication"] = 1  # the embedded engine, and the tests' single broker
        if label == "POST /api/v1/topics/{name}/redrive" and isinstance(case.body, dict):
            # A made-up message_id is rightly a 404 (no such dead letter), which the stateful
            # phase reads as "created resource not found" (ST302) right after the topic's
            # create; redrive of one message is tested with real ids (test_delivery, console).
            case.body.pop("message_id", None)
    if isinstance(case.query, dict):
        case.query = _integral(case.query)
        _ordered_times(case.query)
        if label == "GET /api/v1/metrics":
            _metrics_step(case.query)
    return case


@schemathesis.hook
def before_call(context: HookContext, case: Case, kwargs: dict[str, Any]) -> None:
    """Just before the request is sent: after generation and after the values schemathesis
    substitutes from earlier responses, in every phase."""
    meta = case.meta
    # The document's own examples carry no generation mode: they are valid requests.
    positive = meta is None or meta.generation.mode == "positive"
    _documented(context, case, positive, kwargs)

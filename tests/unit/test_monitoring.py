"""The Grafana dashboard and the Prometheus alerting rules under k8s/, against a real server.

Every metric name a dashboard panel or an alert queries must be in what a running server's
``/metrics`` returns (a renamed metric otherwise leaves an empty panel and an alert that never
fires), the rules must pass ``promtool check rules`` and fire on the series they are meant for
(``promtool test rules``), and the exposition itself must pass ``promtool check metrics``.
promtool comes from Debian's ``prometheus`` package, installed when missing
(``scripts/services.py promtool``).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.backends import services
from tests.conftest import MqfastProcess, new_server, stop_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DASHBOARD = K8S / "mqfast-dashboard.json"
RULES = K8S / "prometheusrule.yaml"
PRODUCE = "/api/v1/messages"
CONSUME = "/api/v1/messages/consume"
ACK = "/api/v1/messages/acknowledge"
# Words of PromQL that look like metric names: operators, modifiers, and (being followed by a
# parenthesis) functions and aggregations, which the identifier scan below skips anyway.
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                "group_left", "group_right", "inf", "nan"}  # fmt: skip


@cache
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@cache
def rule_groups() -> dict[str, Any]:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["kind"] == "PrometheusRule"
    spec: dict[str, Any] = doc["spec"]
    return spec


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups()["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers outside strings, label matchers,
    ranges and grouping clauses, not followed by ``(`` (a function or aggregation)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = re.finditer(r"(?<![\w.$])([a-zA-Z_:][\w:]*)(?!\w)(\s*\()?", text)
    return {m.group(1) for m in found if not m.group(2) and m.group(1) not in PROMQL_WORDS}


def test_metric_names_reads_selectors_not_functions_labels_or_numbers() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (route, le) (rate(a_bucket{code=~"5..", x="b_c"}'
        "[$__rate_interval]))) / clamp_min(sum(rate(b_total[5m])), 1e-9) > 0.015 "
        "or vector(0) and on (pod) c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def promtool() -> str:
    return str(services.promtool())


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


# --- a real server's exposition ---------------------------------------------------------------


@pytest.fixture(scope="module", params=["1", "2"], ids=lambda n: f"workers={n}")
def scraped(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """``/metrics`` of a server that produced, delivered without acknowledging, dead-lettered
    and refused a request, once the metric sampler has seen the group and the dead letter.
    With one worker and with two (whose supervisor merges their families into one scrape)."""
    srv = new_server(
        tmp_path_factory.mktemp("monitoring"),
        MESSAGE_QUEUE_METRICS_INTERVAL="200ms",
        MESSAGE_QUEUE_DELIVERY_LIMIT="1",
        MESSAGE_QUEUE_WORKERS=request.param,
    ).start()
    try:
        exercise(srv)
        yield wait_for_levels(srv)
    finally:
        stop_server(srv)


def exercise(srv: MqfastProcess) -> None:
    for i in range(5):
        r = srv.request("POST", PRODUCE, {"topic": "orders", "content": f"order {i}"})
        assert r.status == 200, r.body
    body = {"topic": "orders", "group_id": "slow", "consumer_id": "c1", "max_messages": 2,
            "timeout": "0s"}  # fmt: skip
    first, _ = srv.request("POST", CONSUME, body).json()["messages"]
    r = srv.request("POST", ACK, {"message_id": first["message_id"], "group_id": "slow",
                                  "success": False})  # fmt: skip
    assert r.json()["status"] == "dead_lettered", r.body
    assert srv.request("POST", PRODUCE, {"topic": "", "content": "x"}).status == 400


def wait_for_levels(srv: MqfastProcess, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = srv.request("GET", "/metrics", port=srv.metrics_port).body.decode()
        if all(
            s in text
            for s in (
                'message_queue_oldest_unacked_age_seconds{group="slow",topic="orders"}',
                'message_queue_dead_letter_messages{topic="orders"} 1.0',
            )
        ):
            return text
        assert time.monotonic() < deadline, f"the sampler never reported the group:\n{text}"
        time.sleep(0.1)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_server_exports_group_health_and_dead_letter_levels(scraped: str) -> None:
    got = samples(scraped)
    p = "message_queue_"
    mine = {"group": "slow", "topic": "orders"}
    # 5 produced, 2 delivered to the group, one of them dead-lettered (so completed): 4 not.
    assert got[p + "consumer_group_lag"] == [(mine, 4.0)]
    [(labels, age)] = got[p + "oldest_unacked_age_seconds"]
    assert labels == mine and 0 <= age < 300
    assert got[p + "dead_letter_messages"] == [({"topic": "orders"}, 1.0)]
    assert dict((s["status"], v) for s, v in got[p + "health_status"]) == {
        "ok": 1.0,
        "degraded": 0.0,
        "down": 0.0,
    }
    assert got[p + "health_check_up"] == [({"check": "engine"}, 1.0)]
    assert got[p + "gc_pauses_total"][0][1] >= 1  # the worker collects once before serving


def test_exposition_passes_promtool_check_metrics(scraped: str) -> None:
    r = run_promtool("check", "metrics", stdin=scraped)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r


@pytest.mark.parametrize("what", ["dashboard", "rules"])
def test_every_queried_metric_is_exported(scraped: str, what: str) -> None:
    exprs = dashboard_exprs() if what == "dashboard" else [a["expr"] for a in alerts()]
    queried = set().union(*(metric_names(e) for e in exprs))
    assert queried, what
    missing = queried - set(samples(scraped))
    assert not missing, f"{what} queries metrics /metrics does not export: {sorted(missing)}"


@pytest.mark.parametrize("what", ["dashboard", "rules"])
def test_label_matchers_name_labels_the_metric_has(scraped: str, what: str) -> None:
    # A matcher on a label the metric lacks ({status="5.."} for {code=...}) selects nothing.
    exprs = dashboard_exprs() if what == "dashboard" else [a["expr"] for a in alerts()]
    got = samples(scraped)
    for e in exprs:
        for name, matchers in re.findall(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", e):
            have = {k for labels, _ in got[name] for k in labels}
            used = set(re.findall(r"(\w+)\s*[=!~]", matchers))
            assert used <= have, f"{name}{{{matchers}}}: {sorted(used - have)} not in {have}"


# --- the dashboard ----------------------------------------------------------------------------


def test_dashboard_panels_are_well_formed() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    [var] = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus"
    for p in panels():
        assert p["datasource"]["uid"] == "${" + var["name"] + "}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


@pytest.mark.parametrize(
    "pattern",
    [
        r"rate\(message_queue_messages_produced_total",
        r"rate\(message_queue_messages_consumed_total",
        r"histogram_quantile\(0\.5, .*message_queue_processing_latency_seconds_bucket",
        r"histogram_quantile\(0\.99, .*message_queue_processing_latency_seconds_bucket",
        r"message_queue_inflight_messages",
        r"by \(group, topic\) \(message_queue_consumer_group_lag\)",
        r"by \(group, topic\) \(message_queue_oldest_unacked_age_seconds\)",
        r"message_queue_dead_letter_messages",
        r'message_queue_http_requests_total\{code=~"4\.\."\}',
        r'message_queue_http_requests_total\{code=~"5\.\."\}',
        r"rate\(message_queue_gc_pause_seconds_total",
    ],
)
def test_dashboard_has_a_panel_for(pattern: str) -> None:
    assert any(re.search(pattern, e) for e in dashboard_exprs()), pattern


def test_latency_quantiles_group_by_route_and_bucket() -> None:
    for e in dashboard_exprs():
        if "histogram_quantile" in e:
            assert "sum by (route, le)" in e, e


# --- the alerting rules -----------------------------------------------------------------------


def rules_file(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as the plain rules file Prometheus and promtool read."""
    path = tmp_path / "mqfast-rules.yml"
    path.write_text(yaml.safe_dump(rule_groups()))
    return path


def test_rules_pass_promtool_check_rules(tmp_path: Path) -> None:
    r = run_promtool("check", "rules", str(rules_file(tmp_path)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout


def test_alerts_have_severity_summary_description_and_a_for() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    for a in alerts():
        assert a["labels"]["severity"] in ("warning", "critical"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        assert re.fullmatch(r"\d+[sm]", a["for"]), a["alert"]


def test_rules_cover_the_issue_list() -> None:
    exprs = {a["alert"]: a["expr"] for a in alerts()}
    assert "message_queue_messages_dead_lettered_total" in exprs["MessageQueueDeadLettersGrowing"]
    assert "message_queue_consumer_group_lag" in exprs["MessageQueueConsumerLagHigh"]
    assert "histogram_quantile(0.99" in exprs["MessageQueueP99LatencyHigh"]
    assert 'check="engine"' in exprs["MessageQueueEngineDown"]
    assert 'code=~"5.."' in exprs["MessageQueue5xxRate"]


# promtool unit tests: each alert fires on the series it is for, with its `for:` waited out,
# stays quiet on a healthy pod, and renders its summary. (promtool compares every annotation:
# the descriptions are left out of this run; `check rules` parses their templates.)
ALERT_TESTS: list[dict[str, Any]] = [
    {
        "interval": "1m",
        "input_series": [
            {"series": 'message_queue_health_check_up{check="engine",instance="a"}',
             "values": "1 0x10"},
            {"series": 'message_queue_health_check_up{check="engine",instance="b"}',
             "values": "1x10"},
            {"series": 'message_queue_health_status{status="degraded",instance="b"}',
             "values": "1x10"},
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "MessageQueueEngineDown",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "instance": "a"},
                             "exp_annotations": {"summary": "mqfast on a cannot store messages"}}]},
            {"eval_time": "3m", "alertname": "MessageQueueDegraded", "exp_alerts": []},
            {"eval_time": "6m", "alertname": "MessageQueueDegraded",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "b"},
                             "exp_annotations": {"summary": "mqfast on b is degraded"}}]},
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": 'message_queue_consumer_group_lag{group="slow",topic="t",instance="a"}',
             "values": "20000x20"},
            {"series": 'message_queue_consumer_group_lag{group="ok",topic="t",instance="a"}',
             "values": "5x20"},
            {"series": 'message_queue_oldest_unacked_age_seconds{group="slow",topic="t"}',
             "values": "400x20"},
            {"series": 'message_queue_messages_dead_lettered_total{topic="t",instance="a"}',
             "values": "0+3x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "MessageQueueConsumerLagHigh",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "group": "slow",
                                            "topic": "t"},
                             "exp_annotations": {
                                 "summary": "Group slow is 20000 messages behind on t"}}]},
            {"eval_time": "10m", "alertname": "MessageQueueUnackedTooOld",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "group": "slow",
                                            "topic": "t"},
                             "exp_annotations": {"summary": "Group slow holds a delivery of t "
                                                            "unacknowledged for 6m 40s"}}]},
            {"eval_time": "25m", "alertname": "MessageQueueDeadLettersGrowing",
             "exp_alerts": [{"exp_labels": {"severity": "warning", "topic": "t"},
                             "exp_annotations": {
                                 "summary": "Messages of t keep going to t.dlq"}}]},
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            # 100 requests a minute: on produce 5 % slower than 25 ms, on consume (a long
            # poll, left out of the latency alert) all of them; 3 % of responses are 503.
            *[{"series": "message_queue_processing_latency_seconds_bucket"
                         f'{{route="/api/v1/messages",le="{le}"}}',
               "values": f"0+{n}x30"}
              for le, n in (("0.005", 90), ("0.01", 94), ("0.025", 95), ("+Inf", 100))],
            *[{"series": "message_queue_processing_latency_seconds_bucket"
                         f'{{route="/api/v1/messages/consume",le="{le}"}}',
               "values": f"0+{n}x30"} for le, n in (("0.005", 0), ("+Inf", 100))],
            {"series": 'message_queue_http_requests_total{route="/api/v1/messages",code="200"}',
             "values": "0+97x30"},
            {"series": 'message_queue_http_requests_total{route="/api/v1/messages",code="503"}',
             "values": "0+3x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "MessageQueueP99LatencyHigh",
             "exp_alerts": [{"exp_labels": {"severity": "warning",
                                            "route": "/api/v1/messages"},
                             "exp_annotations": {"summary": "mqfast p99 latency on "
                                                            "/api/v1/messages is 25ms"}}]},
            {"eval_time": "20m", "alertname": "MessageQueue5xxRate",
             "exp_alerts": [{"exp_labels": {"severity": "critical"},
                             "exp_annotations": {
                                 "summary": "3% of mqfast responses are 5xx"}}]},
        ],
    },
]  # fmt: skip


def test_alerts_fire_on_the_series_they_are_for(tmp_path: Path) -> None:
    groups = rule_groups()
    stripped = {"groups": [
        {**g, "rules": [{**r, "annotations": {"summary": r["annotations"]["summary"]}}
                        for r in g["rules"]]}
        for g in groups["groups"]
    ]}  # fmt: skip
    rules = tmp_path / "mqfast-rules.yml"
    rules.write_text(yaml.safe_dump(stripped))
    tests = tmp_path / "mqfast-rules.test.yml"
    plan = {"rule_files": [rules.name], "evaluation_interval": "1m", "tests": ALERT_TESTS}
    tests.write_text(yaml.safe_dump(plan))
    r = run_promtool("test", "rules", str(tests))
    assert r.returncode == 0, r.stdout + r.stderr
    tested = {t["alertname"] for case in ALERT_TESTS for t in case["alert_rule_test"]}
    assert tested == {a["alert"] for a in alerts()}

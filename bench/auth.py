"""Produce with a security feature on against off, side by side in one run.

``--feature auth`` (the default; the security bar: on loses no more than 10 %): once without and
once with ``MESSAGE_QUEUE_JWT_SECRET``, every request then carrying a bearer token (the core
looks it up in its cache of verified tokens and checks the ``produce`` grant).
``--feature encryption``: the topic plain, then encrypted at rest (``"encrypted": true`` with a
master key configured: AES-256-GCM per message on the engine's write path).

Each repetition starts a fresh server (pinned to CPU 0) for each mode and measures the same
scenarios with ``bench/loadgen.py`` on CPU 1: on the embedded engine closed loop and a fixed
rate; with ``--engine kafka`` closed loop and batches of 100 (each server gets its own topic;
Kafka, PostgreSQL and Redis come from ``--reuse-env FILE`` or are started by
``scripts/services.py`` for the run). The modes alternate so that drift of a shared machine hits
both. Results go to the section of ``bench/RESULTS.md`` between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->``, NAME being the feature (``auth``, ``encryption``) with ``-kafka`` after it
for the Kafka engine.

Run: ``.venv/bin/python bench/auth.py [--feature encryption] [--engine kafka]`` (``--reps 1
--duration 3`` for a quick check).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SECRET = "bench-secret-0123456789-0123456789-0123456789"
MASTER_KEYS = "bench:" + "QmVuY2gtbWFzdGVyLWtleS0wMTIzNDU2Nzg5YWJjZGU="  # 32 bytes, base64
FEATURES = {
    "auth": (
        "Authentication on vs off",
        "`MESSAGE_QUEUE_JWT_SECRET` set, every request carries a bearer token (HS256, role "
        "producer): a cached verification plus the produce permission check",
    ),
    "encryption": (
        "Encryption at rest on vs off",
        'the topic created with `"encrypted": true` and a master key configured: every '
        "message encrypted with AES-256-GCM (random nonce, data key wrapped by the master key)",
    ),
}
LOADS = {
    "closed-256": ["--mode", "closed", "--connections", "256"],
    "open-5000": ["--mode", "open", "--rate", "5000", "--connections", "64"],
    "batch-100": ["--mode", "closed", "--connections", "64", "--batch", "100"],
}
SCENARIOS = {"embedded": ("closed-256", "open-5000"), "kafka": ("closed-256", "batch-100")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(sub: str, roles: list[str]) -> str:
    sys.path.insert(0, str(ROOT / "src"))
    from mqfast.auth import make_token
    from mqfast.config import Settings

    settings = Settings.from_env({"MESSAGE_QUEUE_JWT_SECRET": SECRET})
    return make_token(settings, sub, roles, None, ttl_s=3600)


def markers(feature: str) -> tuple[str, str]:
    return f"<!-- {feature}:begin -->", f"<!-- {feature}:end -->"


def start(
    feature: str, on: bool, data: Path, topic: str, engine_env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        **engine_env,
        "MESSAGE_QUEUE_PORT": str(port),
        "MESSAGE_QUEUE_DATA_DIR": str(data),
        "METRICS_ADDR": "off",
        "PPROF_ADDR": "off",
        "MESSAGE_QUEUE_LOG_LEVEL": "WARNING",
    }
    if on and feature == "auth":
        env["MESSAGE_QUEUE_JWT_SECRET"] = SECRET
    if feature == "encryption":
        env["MESSAGE_QUEUE_MASTER_KEYS"] = MASTER_KEYS
    proc = subprocess.Popen(
        ["taskset", "-c", "0", str(ROOT / ".venv/bin/mqfast"), "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1):
                pass
        except OSError:
            time.sleep(0.05)
            continue
        if feature == "encryption":  # made here: loadgen's own creation then finds it
            body = json.dumps({"name": topic, "partitions": 1, "encrypted": on}).encode()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/v1/topics",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert json.load(resp)["encrypted"] is on
        return proc, port
    proc.kill()
    raise SystemExit("server did not start")


def load(
    port: int, scenario: str, topic: str, duration: float, bearer: str | None, admin: str | None
) -> Any:
    out = Path(tempfile.mktemp(suffix=".json"))
    cmd = ["taskset", "-c", "1", PY, str(ROOT / "bench/loadgen.py")]
    kind = "batch" if "--batch" in LOADS[scenario] else "produce"
    cmd += ["--url", f"http://127.0.0.1:{port}", "--scenario", kind, "--size", "100"]
    cmd += [*LOADS[scenario], "--topic", topic, "--duration", str(duration), "--warmup", "2"]
    cmd += ["--json", str(out), "--quiet"]
    if bearer:
        cmd += ["--bearer", bearer, "--admin-bearer", admin or bearer]
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feature", choices=sorted(FEATURES), default="auth")
    p.add_argument("--engine", choices=sorted(SCENARIOS), default="embedded")
    p.add_argument("--reuse-env", help="Kafka engine: a file of VAR=value lines (services up)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--results-md", default=str(ROOT / "bench/RESULTS.md"))
    args = p.parse_args()
    with ExitStack() as stack:
        engine_env = services_env(args, stack) if args.engine == "kafka" else {}
        figures = measure(args, engine_env)
    write(Path(args.results_md), figures, args)
    return 0


def services_env(args: argparse.Namespace, stack: ExitStack) -> dict[str, str]:
    """The environment of the Kafka engine: from ``--reuse-env``, or services started now."""
    env = {"MESSAGE_QUEUE_ENGINE": "kafka"}
    if args.reuse_env:
        for line in Path(args.reuse_env).read_text().splitlines():
            name, sep, value = line.removeprefix("export ").partition("=")
            if sep:
                env[name.strip()] = value.strip()
        return env
    sys.path.insert(0, str(ROOT / "scripts"))
    import services

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mqfast-bench-")))
    kafka = services.start_kafka(work / "kafka")
    stack.callback(kafka.stop)
    pg = services.start_postgres(work / "pg")
    stack.callback(pg.stop)
    redis = services.start_redis(work / "redis")
    stack.callback(redis.stop)
    env.update(services.env_for(kafka, pg, redis))
    return env


def measure(
    args: argparse.Namespace, engine_env: dict[str, str]
) -> dict[tuple[str, str], list[dict[str, float]]]:
    producer, admin = token("bench", ["producer"]), token("ops", ["admin"])
    figures: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rep in range(args.reps):
        for on in (False, True):
            auth = on and args.feature == "auth"
            # A topic per server on Kafka, where topics outlive the server.
            topic = "bench" if args.engine == "embedded" else f"bench-{uuid.uuid4().hex[:8]}"
            with tempfile.TemporaryDirectory() as d:
                proc, port = start(args.feature, on, Path(d), topic, engine_env)
                try:
                    for scenario in SCENARIOS[args.engine]:
                        bearer = producer if auth else None
                        r = load(port, scenario, topic, args.duration, bearer, admin)
                        if r.get("errors"):
                            raise SystemExit(f"{scenario} {args.feature}={on}: {r['errors']}")
                        mode = "on" if on else "off"
                        fig = {
                            "rps": float(r["req_per_s"]),
                            "p50": r["latency_us"]["p50"] / 1000,
                            "p99": r["latency_us"]["p99"] / 1000,
                        }
                        figures.setdefault((scenario, mode), []).append(fig)
                        line = f"rep {rep + 1} {args.feature} {mode:3} {scenario:10} "
                        line += f"{fig['rps']:>9,.0f}"
                        line += f" req/s p50 {fig['p50']:.2f} p99 {fig['p99']:.2f} ms"
                        print(line, flush=True)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(30)
    return figures


def med(xs: list[dict[str, float]], k: str) -> float:
    return statistics.median(x[k] for x in xs)


def write(md: Path, figures: dict[tuple[str, str], list[dict[str, float]]], args: Any) -> None:
    rows = []
    for scenario in SCENARIOS[args.engine]:
        off, on = figures[(scenario, "off")], figures[(scenario, "on")]
        rows.append(
            f"| {scenario} | {med(off, 'rps'):,.0f} | {med(on, 'rps'):,.0f} | "
            f"{med(on, 'rps') / med(off, 'rps'):.2f}× | {med(off, 'p50'):.2f} / "
            f"{med(off, 'p99'):.2f} | {med(on, 'p50'):.2f} / {med(on, 'p99'):.2f} |"
        )
    closed = figures[("closed-256", "on")], figures[("closed-256", "off")]
    loss = 1 - med(closed[0], "rps") / med(closed[1], "rps")
    title, what = FEATURES[args.feature]
    kafka = args.engine == "kafka"
    begin, end = markers(args.feature + ("-kafka" if kafka else ""))
    verdict = f"**{loss * 100:.1f} %**"
    if args.feature == "auth":
        verdict += f" (bar: ≤ 10 %: {'met' if loss <= 0.10 else 'NOT met'})"
    command = "bench/auth.py" + ("" if args.feature == "auth" else f" --feature {args.feature}")
    if kafka:
        title += " on the Kafka engine"
        command += " --engine kafka" + (" --reuse-env FILE" if args.reuse_env else "")
    engine = (
        "Kafka engine (single-node Kafka 4.4, acks=all; batch-100 rows are requests of 100 "
        "messages)"
        if kafka
        else "embedded engine"
    )
    text = "\n".join(
        [
            begin,
            f"## {title} (`{command}`)",
            "",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"{args.reps} repetitions of {args.duration:g} s, modes alternating; {engine}; "
            "server pinned to CPU 0, loadgen on CPU 1; 100 B payloads",
            f"- On: {what}",
            "",
            "| scenario | req/s off | req/s on | on ÷ off | p50 / p99 ms off | p50 / p99 ms on |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Throughput lost with {args.feature} on (closed loop, 256 connections): {verdict}.",
            end,
            "",
        ]
    )
    old = md.read_text() if md.exists() else ""
    i, j = old.find(begin), old.find(end)
    if i != -1 and j > i:
        new = old[:i] + text.rstrip("\n") + old[j + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    md.write_text(new)
    print(f"{args.feature} on loses {loss * 100:.1f} % of closed-loop throughput; wrote {md}")


if __name__ == "__main__":
    sys.exit(main())

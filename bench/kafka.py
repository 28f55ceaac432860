"""The Kafka engine measured against the ceiling it sits on: a plain confluent-kafka producer loop.

What it measures
    One run starts a single-node Kafka, PostgreSQL and Redis on loopback (``scripts/services.py``,
    in a temporary directory; ``--reuse-env FILE`` takes running ones instead), then for each
    repetition:

    - ``plain-loop``: a Python process pinned to CPU 0 (``taskset -c 0``), alone on it, that
      builds a ``confluent_kafka.Producer`` from mqfast's own ``producer_config`` (same acks,
      idempotence, compression, linger, batch size; ``--kafka-opt`` changes both alike) and
      produces ``--messages`` messages of ``--size`` bytes with the header mqfast writes
      (``mqfast-id``), ``poll(0)`` after each, a counting delivery callback, ``flush()`` at the
      end. messages/s = delivered ÷ (first produce → flush returned).
    - mqfast on the Kafka engine, ``taskset -c 0``, the load generator (``bench/loadgen.py``) on
      CPU 1, as ``bench/run.py`` does: ``open-R`` (single produce at a fixed R req/s, 64
      connections, latency from the intended send time), ``closed-64`` / ``closed-256`` (single
      produce, maximum req/s), ``batch-100`` (100 messages per request, 64 connections), then
      ``consume-ack`` (``bench/consume.py``: consume + batch acknowledge, 4 consumers).

    Kafka (a JVM), PostgreSQL and Redis are not pinned: they run wherever the scheduler puts them,
    on both cores, for the plain loop and mqfast alike. The broker's CPU use is sampled per run
    when this script started it.

How to read the result
    ``bench/RESULTS.md`` gets (only) the section between ``<!-- kafka:begin -->`` and
    ``<!-- kafka:end -->``: medians over the repetitions with min–max, the plain loop's
    messages/s and the ratio mqfast batch-100 msg/s ÷ plain loop msg/s with the bar (≥ 0.5).
    ``bench/out/kafka-results.json`` has every run. ``server CPU`` near 100 % means mqfast's core
    was the limit; ``kafka CPU`` is the broker's average share of one core during the run.

Run::

    .venv/bin/python bench/kafka.py --quick      # ~1 minute: 1 repetition, 2 s runs
    .venv/bin/python bench/kafka.py              # 3 repetitions, 10 s runs, ~6 minutes
    .venv/bin/python bench/kafka.py --reuse-env services.env --kafka-opt linger.ms=5 \\
        --scenarios batch-100 --no-consume --results-md /tmp/linger5.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "scripts"))

import run as bench_run  # noqa: E402

BEGIN = "<!-- kafka:begin -->"
END = "<!-- kafka:end -->"
BAR = 0.5  # mqfast batch produce msg/s ÷ plain producer loop msg/s, same run (TARGETS.md)
TOPIC = "bench"
PLAIN_TOPIC = "bench-plain"
ID_POOL = 1024  # distinct mqfast-id headers cycled by the plain loop; a power of two
SHOWN_SETTINGS = ("acks", "enable.idempotence", "compression.type", "linger.ms", "batch.size")


@dataclass
class Scenario:
    name: str
    args: list[str]  # loadgen arguments (without --url, --duration, --warmup)
    title: str
    rate: float | None = None


def scenarios(size: int, rates: list[float]) -> list[Scenario]:
    prod = ["--scenario", "produce", "--size", str(size)]
    # Fixed rates first, on a server in steady state, as bench/run.py does.
    out = [
        Scenario(
            f"open-{r:g}",
            [*prod, "--mode", "open", "--rate", f"{r:g}", "--connections", "64"],
            f"produce, open loop {r:,.0f} req/s, 64 connections",
            rate=r,
        )
        for r in rates
    ]
    out += [
        Scenario(
            f"closed-{c}",
            [*prod, "--mode", "closed", "--connections", str(c)],
            f"produce, closed loop, {c} connections",
        )
        for c in (64, 256)
    ]
    batch = ["--scenario", "batch", "--batch", "100", "--size", str(size)]
    out.append(
        Scenario(
            "batch-100",
            [*batch, "--mode", "closed", "--connections", "64"],
            "batch of 100 messages per request, closed loop, 64 connections",
        )
    )
    return out


# --------------------------------------------------------------------------- the plain loop


def plain_loop(topic: str, messages: int, size: int, warmup: int) -> dict[str, Any]:
    """Produce ``messages`` as fast as one Python thread can; runs in its own (pinned) process.

    The producer settings come from ``mqfast.sinks.kafka.producer_config`` with the Settings of
    this process's environment, so they are mqfast's, ``KAFKA_OPT_*`` overrides included.
    """
    from confluent_kafka import KafkaError, KafkaException, Producer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    from mqfast.config import Settings
    from mqfast.sinks.kafka import client_config, producer_config, record_headers

    settings = Settings.from_env()
    admin = AdminClient(client_config(settings))
    fut = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic]
    try:
        fut.result(15)
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    conf = producer_config(settings)
    producer = Producer(conf)

    # Same payload shape as bench/loadgen.py (random letters and digits: lz4 finds as little to
    # squeeze as in mqfast's runs) and the headers mqfast's sink builds for a plain message.
    rnd = random.Random(1234)
    alphabet = string.ascii_letters + string.digits
    payloads = [("".join(rnd.choices(alphabet, k=size))).encode() for _ in range(64)]

    plain = [
        SimpleNamespace(message_id=str(uuid.uuid4()), priority=0, expires_ms=0, headers=None)
        for _ in range(ID_POOL)
    ]
    headers: list[Any] = [record_headers(cast(Any, d)) for d in plain]
    delivered = [0]
    failed: Counter[str] = Counter()

    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            delivered[0] += 1
        else:
            failed[err.name()] += 1

    def produce(n: int) -> None:
        send, poll = producer.produce, producer.poll
        ts = 0
        i = 0
        while i < n:
            if not i & (ID_POOL - 1):
                ts = time.time_ns() // 1_000_000
            try:
                send(
                    topic,
                    payloads[i & 63],
                    None,
                    partition=0,
                    timestamp=ts,
                    headers=headers[i & (ID_POOL - 1)],
                    on_delivery=on_delivery,
                )
            except BufferError:
                poll(0.0005)  # local queue full: the broker is the limit for a moment
                continue
            poll(0)
            i += 1

    # Unmeasured: connecting, fetching metadata and the idempotent producer id cost the first
    # messages tens of milliseconds that a long-running gateway never pays again.
    produce(warmup)
    producer.flush(30)
    delivered[0] = 0
    failed.clear()
    cpu0, t0 = time.process_time(), time.perf_counter()
    produce(messages)
    left = producer.flush(120)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {
        "messages": messages,
        "delivered": delivered[0],
        "failed": dict(failed),
        "unflushed": left,
        "seconds": round(elapsed, 4),
        "msg_per_s": delivered[0] / elapsed,
        "cpu": cpu / elapsed,  # process CPU (all threads) per wall second, pinned to one core
        "settings": {k: str(v) for k, v in conf.items() if k in SHOWN_SETTINGS},
    }


def plain_loop_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kafka.py --plain-loop")
    p.add_argument("--topic", default=PLAIN_TOPIC)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--warmup-messages", type=int, default=20_000)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    res = plain_loop(a.topic, a.messages, a.size, a.warmup_messages)
    Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


def plain_consume_loop(topic: str, messages: int, batch: int) -> dict[str, Any]:
    """Read ``topic`` from its start with a fresh consumer group in batches of ``batch``,
    committing (synchronously) after each batch, as a plain confluent-kafka application would;
    runs in its own (pinned) process. The reference for mqfast's consume + acknowledge.

    The consumer settings are mqfast's own (``consumer_config``), so both read alike.
    """
    from confluent_kafka import Consumer, TopicPartition

    from mqfast.config import Settings
    from mqfast.sinks.kafka import consumer_config

    settings = Settings.from_env()
    consumer = Consumer(consumer_config(settings, f"plain-{uuid.uuid4().hex[:8]}"))
    meta = consumer.list_topics(topic, timeout=15)
    parts = sorted(meta.topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    got = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    idle_since = time.perf_counter()
    while got < messages and time.perf_counter() - idle_since < 10:
        msgs = consumer.consume(batch, 1.0)
        ok = [m for m in msgs if m.error() is None]
        if not ok:
            continue
        done: dict[int, int] = {}
        for m in ok:  # what an application touches of each message
            m.value()
            m.headers()
            done[m.partition()] = m.offset() + 1
        got += len(ok)
        # (mqfast's settings store no offsets by themselves: commit the batch's explicitly)
        consumer.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in done.items()], asynchronous=False
        )
        idle_since = time.perf_counter()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    consumer.close()
    return {
        "messages": got,
        "batch": batch,
        "seconds": round(elapsed, 4),
        "msg_per_s": got / elapsed,
        "cpu": cpu / elapsed,
    }


def plain_consume_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kafka.py --plain-consume")
    p.add_argument("--topic", required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    res = plain_consume_loop(a.topic, a.messages, a.batch)
    Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


def run_plain_consume(
    args: argparse.Namespace, env: dict[str, str], tmp: Path, rep: int, topic: str, batch: int
) -> dict[str, Any]:
    out = tmp / f"plain-consume-{rep}.json"
    cmd = (["taskset", "-c", "0"] if args.pin else []) + [
        sys.executable,
        str(Path(__file__).resolve()),
        "--plain-consume",
        "--topic",
        topic,
        "--messages",
        str(args.consume_messages),
        "--batch",
        str(batch),
        "--json",
        str(out),
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"plain consume loop failed ({p.returncode}): {p.stderr[-800:]}")
    res: dict[str, Any] = json.loads(out.read_text())
    res["cmd"] = shlex.join(cmd).replace(str(tmp), "TMP").replace(str(ROOT) + "/", "")
    return res


def run_plain(
    args: argparse.Namespace, env: dict[str, str], tmp: Path, rep: int, kafka_pid: int | None
) -> dict[str, Any]:
    out = tmp / f"plain-{rep}.json"
    cmd = (["taskset", "-c", "0"] if args.pin else []) + [
        sys.executable,
        str(Path(__file__).resolve()),
        "--plain-loop",
        "--messages",
        str(args.messages),
        "--size",
        str(args.size),
        "--json",
        str(out),
    ]
    with BrokerCpu(kafka_pid) as kcpu:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"plain loop failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    res: dict[str, Any] = json.loads(out.read_text())
    res["kafka_cpu"] = kcpu.value
    res["cmd"] = shlex.join(cmd).replace(str(tmp), "TMP").replace(str(ROOT) + "/", "")
    return res


# --------------------------------------------------------------------------- services


class Services:
    """Kafka + PostgreSQL + Redis: started here (and stopped at the end) or reused from a file."""

    def __init__(self, reuse_env: str | None, workdir: Path) -> None:
        self.reuse_env = reuse_env
        self.workdir = workdir
        self.env: dict[str, str] = {}
        self.kafka_version = "unknown"
        self.kafka_pid: int | None = None
        self._started: list[Any] = []

    def __enter__(self) -> Services:
        import services

        if self.reuse_env:
            for line in Path(self.reuse_env).read_text().splitlines():
                words = shlex.split(line)
                if words[:1] == ["export"] and len(words) == 2 and "=" in words[1]:
                    k, v = words[1].split("=", 1)
                    self.env[k] = v
            if "KAFKA_BROKERS" not in self.env:
                raise SystemExit(f"{self.reuse_env}: no KAFKA_BROKERS line")
            # Only the installed version is known: a reused broker could be another one.
            with suppress(services.ServiceError, OSError):
                self.kafka_version = services.kafka_version(services.kafka_lib()) + " (installed)"
            return self
        try:
            kafka = services.start_kafka(self.workdir / "kafka", brokers=1)
            self._started.append(kafka)
            pg = services.start_postgres(self.workdir / "postgres")
            self._started.append(pg)
            redis = services.start_redis(self.workdir / "redis")
            self._started.append(redis)
        except BaseException:
            self.__exit__()
            raise
        self.env = services.env_for(kafka, pg, redis)
        self.kafka_version = kafka.version
        self.kafka_pid = kafka.nodes[0].pid
        return self

    def __exit__(self, *exc: object) -> None:
        for s in reversed(self._started):
            # Postgres may keep its files outside the work dir (socket path length): destroy()
            # removes those too.
            (getattr(s, "destroy", None) or s.stop)()
        self._started.clear()


class BrokerCpu:
    """The broker's average CPU use (cores) over a ``with`` block; None when its pid is unknown."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.value: float | None = None

    def __enter__(self) -> BrokerCpu:
        if self.pid is not None:
            self._c0 = bench_run.cpu_seconds(bench_run.proc_tree(self.pid))
        self._t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pid is not None:
            c = bench_run.cpu_seconds(bench_run.proc_tree(self.pid)) - self._c0
            self.value = c / max(1e-6, time.monotonic() - self._t0)


# --------------------------------------------------------------------------- mqfast


def mqfast_server(
    args: argparse.Namespace, env: dict[str, str], tmp: Path, rep: int, out_dir: Path
) -> bench_run.Server:
    port, dbg, metrics = bench_run.free_port(), bench_run.free_port(), bench_run.free_port()
    data_dir = tmp / f"mqfast-{rep}"
    data_dir.mkdir()
    senv = dict(env)
    senv.update(
        MESSAGE_QUEUE_ENGINE="kafka",
        MESSAGE_QUEUE_DATA_DIR=str(data_dir),
        METRICS_ADDR=f"127.0.0.1:{metrics}",
        PPROF_ADDR=f"127.0.0.1:{dbg}",
    )
    cmd = [*shlex.split(args.mqfast_cmd), "--port", str(port)]
    log = out_dir / "logs" / "kafka-mqfast.log"
    return bench_run.Server("mqfast", cmd, senv, port, str(data_dir), log, dbg)


def measure(
    srv: bench_run.Server,
    sc: Scenario,
    args: argparse.Namespace,
    tmp: Path,
    rep: int,
    kafka_pid: int | None,
) -> dict[str, Any]:
    # bench/run.py's measurement (loadgen on CPU 1, server CPU/RSS sampling, /debug/gc), so the
    # figures read the same as the embedded engine's.
    rsc = bench_run.Scenario(sc.name, sc.args, ("mqfast",), sc.title, rate=sc.rate)
    with BrokerCpu(kafka_pid) as kcpu:
        res = bench_run.measure(srv, rsc, args, tmp, rep, tmp / "unused.lua")
    res["kafka_cpu"] = kcpu.value
    return res


def run_consume(
    args: argparse.Namespace, srv: bench_run.Server, tmp: Path, rep: int, kafka_pid: int | None
) -> dict[str, Any]:
    out = tmp / f"consume-{rep}.json"
    cmd = (["taskset", "-c", "1"] if args.pin else []) + [
        sys.executable,
        str(BENCH / "consume.py"),
        "--url",
        srv.url,
        "--messages",
        str(args.consume_messages),
        "--size",
        str(args.size),
        "--latency-seconds",
        f"{args.consume_latency_seconds:g}",
        "--json",
        str(out),
    ]
    assert srv.proc is not None
    c0 = bench_run.cpu_seconds(bench_run.proc_tree(srv.proc.pid))
    t0 = time.monotonic()
    with BrokerCpu(kafka_pid) as kcpu:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"consume.py failed ({p.returncode}): {p.stderr.strip()[-800:]}")
    res: dict[str, Any] = json.loads(out.read_text())
    res["server_cpu_avg"] = (bench_run.cpu_seconds(bench_run.proc_tree(srv.proc.pid)) - c0) / (
        time.monotonic() - t0
    )
    res["kafka_cpu"] = kcpu.value
    res["prefilled"] = args.consume_messages
    res["cmd"] = bench_run.generic(shlex.join(cmd)).replace(str(tmp), "TMP")
    return res


def profile(
    srv: bench_run.Server, sc: Scenario, args: argparse.Namespace, tmp: Path, out_dir: Path
) -> Path | None:
    """One extra, unrecorded run of ``sc`` with py-spy attached to the server (collapsed stacks).

    Not counted in the figures: sampling with --native costs the server some of its core.
    """
    spy = ROOT / ".venv/bin/py-spy"
    if not spy.exists() or srv.proc is None:
        print("    profile skipped: .venv/bin/py-spy not installed", flush=True)
        return None
    out = out_dir / f"kafka-profile-{sc.name}.txt"
    secs = args.duration + args.warmup
    cmd = (["taskset", "-c", "1"] if args.pin else []) + [
        str(spy),
        "record",
        "--pid",
        str(srv.proc.pid),
        "--native",
        "--threads",
        "--rate",
        "200",
        "--format",
        "raw",
        "--duration",
        f"{max(1, round(secs))}",
        "--output",
        str(out),
    ]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        measure(srv, sc, args, tmp, 99, None)
    finally:
        try:
            spy_proc.wait(secs + 30)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            spy_proc.wait()
    if not out.exists():
        err = spy_proc.stderr.read().decode() if spy_proc.stderr else ""
        print(f"    profile of {sc.name} failed: {err.strip()[-300:]}", flush=True)
        return None
    print(f"    profile of {sc.name}: {out}", flush=True)
    for line in profile_summary(out):
        print(f"      {line}", flush=True)
    return out


def profile_summary(path: Path, top: int = 12) -> list[str]:
    """Where each thread's samples went, from py-spy's collapsed stacks (``--threads``).

    With ``--native`` py-spy cannot tell a thread blocked in a C call (librdkafka's poll, the
    executor's queue) from a busy one, so a thread's share says little: read the main thread's
    inclusive figures, and whether the other threads sit in a wait.
    """
    threads: Counter[str] = Counter()
    main_incl: Counter[str] = Counter()
    leaves: dict[str, Counter[str]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        threads[thread] += n
        py = [f for f in frames if ".py" in f or ".pyx" in f]
        leaf = (py[-1].split(" (")[0] if py else "?") + " > " + frames[-1].split(" (")[0]
        leaves.setdefault(thread, Counter())[leaf] += n
        if "MainThread" in thread:
            for name in {f.split(" (")[0] for f in frames[1:]}:
                main_incl[name] += n
    total = sum(threads.values())
    if not total:
        return ["(no samples)"]
    out = ["samples per thread:"]
    out += [f"  {n / total:6.1%}  {t}" for t, n in threads.most_common()]
    for t, c in leaves.items():
        if "MainThread" in t:
            continue
        leaf, n = c.most_common(1)[0]
        out.append(f"{t}: {n / threads[t]:.0%} of its samples in {leaf[:90]}")
    main = next((n for t, n in threads.items() if "MainThread" in t), 0)
    if main:
        out.append("main thread, inclusive (share of its samples):")
        # The event loop's and the HTTP parser's frames are on every stack: leave them out.
        skip = (
            *("thread", "<module>", "main", "run", "Runner", "0x", "Py_", "uv_", "loop", "Loop"),
            *("llhttp", "parser_cb", "feed_data", "data_received", "on_message_complete"),
        )
        shown = [(f, n) for f, n in main_incl.most_common() if not f.startswith(skip)]
        out += [f"  {n / main:6.1%}  {f[:100]}" for f, n in shown[: top * 2]]
    return out


# --------------------------------------------------------------------------- report


def med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(t: tuple[float, float, float], spec: str = ",.0f") -> str:
    return bench_run.fmt(t, spec)


def cpu_cell(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):.0%}" if known else "n/a"


def versions(kafka_version: str) -> dict[str, str]:
    import confluent_kafka

    out = {"python": sys.version.split()[0]}
    for pkg in ("mqfast", "confluent-kafka", "uvloop", "msgspec"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["librdkafka"] = confluent_kafka.libversion()[0]
    out["Kafka"] = kafka_version
    with suppress(OSError, subprocess.SubprocessError, IndexError):
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        out["Java"] = java.stderr.splitlines()[0].split('"')[1]
    with suppress(OSError, subprocess.SubprocessError, IndexError):
        r = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
        out["Redis"] = r.stdout.split("v=")[1].split()[0]
    with suppress(Exception):
        import services

        pg_bin = services.pg_bin_dir()
        if pg_bin is not None:
            pg = subprocess.run(
                [str(pg_bin / "postgres"), "--version"], capture_output=True, text=True
            )
            found = re.search(r"\d+(\.\d+)+", pg.stdout)
            if found:
                out["PostgreSQL"] = found.group(0)
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    summ: dict[str, Any] = {
        sc: bench_run.summarize(runs) for sc, runs in results["runs"].items() if runs
    }
    for sc, runs in results["runs"].items():
        if runs:
            summ[sc]["kafka_cpu"] = cpu_cell([r.get("kafka_cpu") for r in runs])
    plain = results["plain"]
    if plain:
        summ["plain-loop"] = {
            "msg_per_s": med([r["msg_per_s"] for r in plain]),
            "cpu": med([r["cpu"] for r in plain]),
            "kafka_cpu": cpu_cell([r.get("kafka_cpu") for r in plain]),
            "failed": sum(sum(r["failed"].values()) + r["unflushed"] for r in plain),
        }
    batch = results["runs"].get("batch-100") or []
    if plain and batch:
        summ["ratio"] = summ["batch-100"]["msg_per_s"][0] / summ["plain-loop"]["msg_per_s"][0]
        pairs = zip(batch, plain, strict=False)
        per_rep = [b["msg_per_s"] / p["msg_per_s"] for b, p in pairs if p["msg_per_s"]]
        summ["ratio_per_rep"] = [min(per_rep), max(per_rep)] if per_rep else None
    consume = results["consume"]
    if consume:
        summ["consume"] = {
            "msg_per_s": med([r["consumed_and_acked_per_s"] for r in consume]),
            "p50_ms": med([r["latency"]["p50_ms"] for r in consume]),
            "p99_ms": med([r["latency"]["p99_ms"] for r in consume]),
            "server_cpu": med([r["server_cpu_avg"] for r in consume]),
            "kafka_cpu": cpu_cell([r.get("kafka_cpu") for r in consume]),
            # (absent from results saved before the reference loop was added)
            "plain_msg_per_s": med([r["plain"]["msg_per_s"] for r in consume if "plain" in r])
            if "plain" in consume[0]
            else None,
            "plain_ratio": med([r["plain_ratio"] for r in consume if "plain" in r])
            if "plain" in consume[0]
            else None,
            "short": [
                (r["messages"], r["prefilled"]) for r in consume if r["messages"] < r["prefilled"]
            ],
        }
    return summ


def render_md(results: dict[str, Any]) -> str:
    m, v, a, summ = results["machine"], results["versions"], results["args"], results["summary"]
    lines = [
        "## Kafka engine (`bench/kafka.py`)",
        "",
        "Generated by `bench/kafka.py` (this section only; `bench/run.py` owns the rest of the "
        "file). Every figure below comes from the one run described here; medians over the "
        "repetitions, min–max in parentheses.",
        "",
        f"- Date: {results['date']}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Command: `{results['command']}`",
        f"- Repetitions: {a['reps']}, {a['duration']:g} s measured after {a['warmup']:g} s "
        f"warm-up per load run, {a['size']} B payloads; plain loop: {a['messages']:,} messages "
        "per repetition after 20,000 unmeasured",
        f"- Services: {results['services']}",
        f"- Producer settings (mqfast's `producer_config`, both sides): {results['producer']}",
        f"- Pinning: {results['pinning']}",
    ]
    lines += [f"- {n}" for n in results["notes"]]
    lines.append("")
    plain = summ.get("plain-loop")
    ratio = summ.get("ratio")
    lines += ["### The bar: mqfast batch produce vs a plain confluent-kafka producer loop", ""]
    if plain and ratio is not None:
        met = "**met**" if ratio >= BAR else "**not met**"
        rng = summ.get("ratio_per_rep")
        per_rep = f" (per repetition {rng[0]:.2f}–{rng[1]:.2f})" if rng else ""
        lines += [
            "| what | msg/s | process CPU | kafka CPU |",
            "|---|---|---|---|",
            f"| plain producer loop (one Python thread, `poll(0)` per message) | "
            f"{fmt(plain['msg_per_s'])} | {plain['cpu'][0]:.0%} | {plain['kafka_cpu']} |",
            f"| mqfast `batch-100` over HTTP | {fmt(summ['batch-100']['msg_per_s'])} | "
            f"{summ['batch-100']['server_cpu'][0]:.0%} | {summ['batch-100']['kafka_cpu']} |",
            "",
            f"Ratio mqfast batch-100 msg/s ÷ plain loop msg/s: **{ratio:.2f}×**{per_rep}; "
            f"the bar is ≥ {BAR:.2f}×: {met}.",
            "",
        ]
        if plain["failed"]:
            lines += [f"Plain loop: {plain['failed']} messages failed or unflushed.", ""]
    else:
        lines += ["No ratio: the plain loop or batch-100 did not run.", ""]
    rows = [sc for sc in results["scenarios"] if sc["name"] in summ]
    if rows:
        lines += [
            "### mqfast on the Kafka engine",
            "",
            "| scenario | req/s | msg/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | "
            "server CPU | kafka CPU | generator | GC max pause ms | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for sc in rows:
            s = summ[sc["name"]]
            gc = f"{s['gc_pause_max_ms']:.2f}" if "gc_pause_max_ms" in s else "n/a"
            lines.append(
                f"| {sc['name']} | {fmt(s['req_per_s'])} | {fmt(s['msg_per_s'])} |"
                f" {fmt(s['p50_ms'], '.2f')} | {fmt(s['p99_ms'], '.2f')} |"
                f" {s['p99.9_ms'][0]:.2f} | {s['max_ms'][0]:.1f} | {s['errors']} |"
                f" {s['server_cpu'][0]:.0%} | {s['kafka_cpu']} | {bench_run.gen(s)} | {gc} |"
                f" {s['rss_peak_mb'][0]:.0f} |"
            )
        lines += [
            "",
            "Open-loop latencies are from each request's intended send time (no coordinated "
            "omission) and include the broker's acknowledgement (acks=all): a 2xx means "
            "durable in Kafka. Closed-loop percentiles are at saturation.",
            "",
            "Scenarios:",
            "",
        ]
        lines += [f"- `{sc['name']}`: {sc['title']}" for sc in rows]
        lines.append("")
    c = summ.get("consume")
    if c:
        c0 = results["consume"][0]
        lines += [
            "### consume-ack on the Kafka engine (`bench/consume.py`)",
            "",
            f"{c0['consumers']} consumers of one group, batches of {c0['batch']} (consume, then "
            f"one batch acknowledge), {c0['prefilled']:,} messages pre-filled over "
            f"{c0['partitions']} partitions; then single produces at {c0['latency']['rate']:g}/s "
            "with the consumers long-polling.",
            "",
            "| consumed + acked msg/s | produce→delivery p50 ms | p99 ms | server CPU (avg) "
            "| kafka CPU |",
            "|---|---|---|---|---|",
            f"| {fmt(c['msg_per_s'])} | {fmt(c['p50_ms'], '.2f')} | {fmt(c['p99_ms'], '.2f')} |"
            f" {c['server_cpu'][0]:.0%} | {c['kafka_cpu']} |",
            "",
        ]
        if "plain" in c0:
            lines += [
                f"Reference, same run: a plain confluent-kafka consumer loop (`taskset -c 0`, "
                f"mqfast's consumer settings) reading the same topic from its start in batches "
                f"of {c0['plain']['batch']}, committing synchronously after each batch: "
                f"{fmt(c['plain_msg_per_s'])} msg/s; mqfast consume + acknowledge ÷ that loop: "
                f"**{fmt(c['plain_ratio'], '.2f')}** (bar ≥ 0.50).",
                "",
            ]
        if c["short"]:
            got = ", ".join(f"{n:,} of {of:,}" for n, of in c["short"])
            lines += [
                f"**The throughput figure is not valid**: the consumers stopped after {got} "
                "messages. `bench/consume.py` ends the throughput phase at the first empty "
                "answer to a consume with `timeout: 0s`; on the Kafka engine such a consume "
                "answers only from what the gateway has already fetched from the broker, so an "
                "empty answer does not mean the backlog is drained.",
                "",
            ]
    cmds = sorted({bench_run.generic(r["cmd"]) for runs in results["runs"].values() for r in runs})
    if results["plain"]:
        cmds.insert(0, results["plain"][0]["cmd"])
    if results["consume"]:
        cmds.append(results["consume"][0]["cmd"])
        if "plain" in results["consume"][0]:
            cmds.append(results["consume"][0]["plain"]["cmd"])
    if cmds:
        lines += ["Commands (server: `" + results["server_cmd"] + "`):", ""]
        lines += [f"    {c}" for c in cmds]
        lines.append("")
    return "\n".join(lines)


def splice_section(path: Path, section: str) -> None:
    """Replace the marked Kafka section of ``path`` (append it if absent); leave the rest alone."""
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}\n"
    start = text.find(BEGIN)
    end = text.find(END, start) if start != -1 else -1
    if start != -1 and end != -1:
        text = text[:start] + block + text[end + len(END) :].lstrip("\n")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    tmp = path.with_name(path.name + ".kafka-tmp")
    tmp.write_text(text)
    tmp.replace(path)  # run.py may read the file meanwhile: never let it see half of it


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, 2 s runs, fewer messages")
    p.add_argument("--reps", type=int, default=3, help="repetitions per scenario (medians)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per load run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per load run")
    p.add_argument("--size", type=int, default=100, help="message content bytes")
    p.add_argument("--messages", type=int, default=1_000_000, help="plain loop messages per rep")
    p.add_argument("--rates", default="2000,5000", help="open-loop fixed rates, req/s")
    p.add_argument("--scenarios", default="", help="comma-separated subset of the load scenarios")
    p.add_argument("--no-plain", action="store_true", help="skip the plain producer loop")
    p.add_argument("--no-consume", action="store_true", help="skip consume-ack")
    p.add_argument("--consume-messages", type=int, default=100_000)
    p.add_argument("--consume-latency-seconds", type=float, default=5.0)
    p.add_argument(
        "--kafka-opt",
        action="append",
        default=[],
        metavar="PROP=VALUE",
        help="librdkafka property for mqfast and the plain loop alike (as KAFKA_OPT_*)",
    )
    p.add_argument(
        "--reuse-env",
        metavar="FILE",
        help="use running services: a file of `export K=V` lines (scripts/services.py up)",
    )
    p.add_argument(
        "--profile",
        default="",
        help="comma-separated scenarios to run once more under py-spy (not counted)",
    )
    p.add_argument("--mqfast-cmd", default=str(ROOT / ".venv/bin/mqfast") + " serve")
    p.add_argument("--out", default=str(BENCH / "out"))
    p.add_argument("--results-md", default=str(BENCH / "RESULTS.md"))
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rewrite the section from OUT/kafka-results.json",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.warmup = 1, 2.0, 0.5
        args.messages = min(args.messages, 300_000)
        args.consume_messages = min(args.consume_messages, 20_000)
        args.consume_latency_seconds = min(args.consume_latency_seconds, 2.0)
    args.pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    return args


def kafka_opt_env(opts: list[str]) -> dict[str, str]:
    """``linger.ms=5`` → ``KAFKA_OPT_LINGER_MS=5`` (mqfast's config maps it back)."""
    out = {}
    for opt in opts:
        prop, sep, value = opt.partition("=")
        if not sep or not prop:
            raise SystemExit(f"--kafka-opt {opt!r}: expected PROP=VALUE")
        out["KAFKA_OPT_" + prop.strip().upper().replace(".", "_")] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plain-loop"]:
        return plain_loop_main(argv[1:])
    if argv[:1] == ["--plain-consume"]:
        return plain_consume_main(argv[1:])
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "kafka-results.json"
    if args.report_only:
        saved = json.loads(json_path.read_text())
        splice_section(Path(args.results_md), render_md(saved))
        print(f"wrote the Kafka section of {args.results_md}")
        return 0
    (out_dir / "logs").mkdir(exist_ok=True)
    if args.pin:
        os.sched_setaffinity(0, {1})  # the orchestrator stays off the server's core
    rates = [float(r) for r in args.rates.split(",") if r]
    all_sc = scenarios(args.size, rates)
    if args.scenarios:
        keep = set(args.scenarios.split(","))
        all_sc = [s for s in all_sc if s.name in keep]
    by_name = {s.name: s for s in scenarios(args.size, rates)}
    to_profile = [by_name[n] for n in args.profile.split(",") if n]
    command = shlex.join([".venv/bin/python", "bench/kafka.py", *argv])
    notes: list[str] = []
    if args.quick:
        notes.append("`--quick`: one repetition of short runs, a smoke check; not for quoting.")
    if args.kafka_opt:
        notes.append("librdkafka overrides: " + ", ".join(f"`{o}`" for o in args.kafka_opt))

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in all_sc}
    plain_runs: list[dict[str, Any]] = []
    consume_runs: list[dict[str, Any]] = []
    failed: list[str] = []
    server_cmd = ""
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.0f}s] {msg}", flush=True)

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mqfast-kbench-")))
        say("services: " + (f"reusing {args.reuse_env}" if args.reuse_env else "starting"))
        svc = stack.enter_context(Services(args.reuse_env, tmp / "services"))
        env = {**os.environ, **svc.env, **kafka_opt_env(args.kafka_opt)}
        from mqfast.config import Settings
        from mqfast.sinks.kafka import producer_config

        pconf = producer_config(Settings.from_env({**env, "MESSAGE_QUEUE_ENGINE": "kafka"}))
        producer = ", ".join(f"{k}={pconf[k]}" for k in SHOWN_SETTINGS if k in pconf)
        for rep in range(args.reps):
            if not args.no_plain:
                say(f"rep {rep + 1}/{args.reps} plain producer loop")
                try:
                    r = run_plain(args, env, tmp, rep, svc.kafka_pid)
                    plain_runs.append(r)
                    print(
                        f"    plain-loop  {r['msg_per_s']:>9,.0f} msg/s  cpu {r['cpu']:.0%}"
                        f"  failed {sum(r['failed'].values()) + r['unflushed']}",
                        flush=True,
                    )
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                    failed.append(f"plain loop, rep {rep + 1}: {e}")
                    print(f"    plain loop failed: {e}", file=sys.stderr, flush=True)
            if not all_sc and args.no_consume and not to_profile:
                continue
            srv = mqfast_server(args, env, tmp, rep, out_dir)
            say(f"rep {rep + 1}/{args.reps} mqfast (kafka engine): start")
            try:
                with bench_run.running(srv, args.pin, args.ready_timeout):
                    server_cmd = bench_run.generic(shlex.join(srv.started)).replace(
                        str(srv.port), "PORT"
                    )
                    warm = Scenario("warm", by_name[f"open-{rates[0]:g}"].args, "", None)
                    wargs = argparse.Namespace(
                        **{**vars(args), "duration": max(1.0, args.warmup), "warmup": 0}
                    )
                    measure(srv, warm, wargs, tmp, rep, None)
                    for sc in all_sc:
                        r = measure(srv, sc, args, tmp, rep, svc.kafka_pid)
                        runs[sc.name].append(r)
                        lat = r.get("latency_us", {})
                        print(
                            f"    {sc.name:<11} {r['req_per_s']:>9,.0f} req/s"
                            f" {r.get('msg_per_s', 0):>10,.0f} msg/s  p50"
                            f" {lat.get('p50', 0) / 1000:6.2f} ms  p99"
                            f" {lat.get('p99', 0) / 1000:7.2f} ms  errors {r['errors'] or '-'}"
                            f"  server cpu {r['server_cpu']:.0%}",
                            flush=True,
                        )
                    if not args.no_consume:
                        c = run_consume(args, srv, tmp, rep, svc.kafka_pid)
                        # The reference: a plain consumer loop over the same topic, same batch.
                        c["plain"] = run_plain_consume(args, env, tmp, rep, c["topic"], c["batch"])
                        c["plain_ratio"] = c["consumed_and_acked_per_s"] / c["plain"]["msg_per_s"]
                        consume_runs.append(c)
                        print(
                            f"    consume-ack {c['consumed_and_acked_per_s']:>9,} msg/s"
                            f"  plain consumer loop {c['plain']['msg_per_s']:>9,.0f} msg/s"
                            f"  ratio {c['plain_ratio']:.2f}"
                            f"  produce->delivery p50 {c['latency']['p50_ms']:.2f} ms"
                            f" p99 {c['latency']['p99_ms']:.2f} ms",
                            flush=True,
                        )
                    if rep == args.reps - 1:
                        for sc in to_profile:
                            profile(srv, sc, args, tmp, out_dir)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                failed.append(f"mqfast, rep {rep + 1}: {e}")
                print(f"    mqfast failed: {e}", file=sys.stderr, flush=True)
        say("stopping services" if not args.reuse_env else "done")
    # Other work on a shared machine moves every figure: say how busy it was.
    notes.append(
        f"1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
        f"end ({os.cpu_count()} CPUs)"
    )
    notes += [f"did not complete: {f}" for f in failed]
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": bench_run.machine(),
        "versions": versions(svc.kafka_version),
        "command": command,
        "args": {k: v for k, v in vars(args).items()},
        "services": (
            f"reused from `{args.reuse_env}` (KAFKA_BROKERS={svc.env['KAFKA_BROKERS']})"
            if args.reuse_env
            else "single-node Kafka (KRaft, combined broker+controller, replication 1), "
            "PostgreSQL and Redis started by `scripts/services.py` on loopback in a temporary "
            "directory for this run"
        ),
        "producer": producer,
        "pinning": (
            "mqfast and the plain loop each under `taskset -c 0` (librdkafka's threads "
            "inherit CPU 0); loadgen, consume.py and this script on CPU 1; Kafka, PostgreSQL "
            "and Redis unpinned (both cores)"
            if args.pin
            else "none (fewer than 2 CPUs or no taskset): figures are not comparable"
        ),
        "notes": notes,
        "server_cmd": server_cmd,
        "scenarios": [{"name": s.name, "title": s.title, "rate": s.rate} for s in all_sc],
        "runs": runs,
        "plain": plain_runs,
        "consume": consume_runs,
    }
    results["summary"] = summarize(results)
    json_path.write_text(json.dumps(results, indent=1))
    splice_section(Path(args.results_md), render_md(results))
    ratio = results["summary"].get("ratio")
    if ratio is not None:
        print(f"ratio mqfast batch-100 ÷ plain loop: {ratio:.2f}× (bar ≥ {BAR:.2f}×)")
    print(f"wrote {json_path} and the Kafka section of {args.results_md}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

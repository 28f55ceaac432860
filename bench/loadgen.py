"""HTTP load generator for mqfast's produce API: throughput (closed loop) and latency (open loop).

What it measures
    ``--mode closed``: the maximum request rate the server sustains with ``--connections``
    keep-alive connections, each sending its next request as soon as the previous answer arrives
    (``--pipeline K`` keeps K requests in flight per connection). Latency is measured from the
    actual send time, so in this mode it is the latency *at saturation* and hides queueing
    (coordinated omission): read the req/s, not the percentiles.

    ``--mode open``: requests are scheduled at a fixed ``--rate`` (request i is *intended* at
    ``start + i / rate``) and each latency is measured from that intended time. A request that waits
    because every connection is busy carries its wait in its latency (no coordinated omission, as
    wrk2). Read the percentiles; the achieved rate must equal the target, otherwise the server (or
    the generator, see ``gen_cpu``) could not keep up and the tail shows it.

How to read the result
    The table gives ``ok``: 2xx answers to the requests of the measured window (sent, or intended,
    after ``--warmup``; answers that came during the drain included); errors by HTTP status
    (``conn`` = connection lost with the request in flight, ``timeout`` = unanswered at the end of
    the drain, ``unsent`` = open-loop requests still queued then); req/s and msg/s (``--batch``
    messages per request): 2xx answered *within* the window (whenever sent) ÷ its length, so an
    overloaded server shows its real rate in open loop too; latency percentiles from an HDR
    histogram (1 µs .. 60 s, 3 significant digits); ``gen_cpu``: the generator's own CPU use. In
    closed loop a ``gen_cpu`` near 100 % means the generator, not the server, may be the limit. In
    open loop the generator polls its schedule (for sub-millisecond send precision) so ``gen_cpu``
    is ~100 % by design; read ``send lag`` instead: how late requests left on an idle connection
    (the generator's own share of the latency). ``--json`` writes all of it, the percentile curve
    and the encoded histogram; ``--plot`` writes the percentile distribution PNG.

Example (load tests target loopback only; other hosts need ``--allow-remote``)::

    taskset -c 1 .venv/bin/python bench/loadgen.py --url http://127.0.0.1:8087 \\
        --scenario produce --mode open --rate 5000 --duration 10 --connections 64 --size 200 \\
        --plot out.png --json out.json

Exit status: 0 done, 2 bad arguments or server unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import ipaddress
import json
import math
import random
import resource
import socket
import string
import sys
import time
from array import array
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

try:
    import uvloop
except ImportError:  # pragma: no cover - the project depends on uvloop
    uvloop = None  # type: ignore[assignment]

import numpy as np
from hdrh.histogram import HdrHistogram

SCENARIOS = ("produce", "produce-async", "batch")
POOL_SIZE = 64  # distinct pre-encoded requests (key and payload vary); a power of two
HIST_MIN_US = 1
HIST_MAX_US = 60_000_000
HIST_DIGITS = 3
FLUSH_AT = 200_000  # latencies buffered in an array before being folded into the histogram
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)


# --------------------------------------------------------------------------- requests

# --idempotency-key: the header and the width of the per-request number written into it.
KEY_HEADER = b"Idempotency-Key: "
KEY_DIGITS = 20


def build_pool(
    host: str,
    scenario: str,
    size: int,
    batch: int,
    topic: str,
    pool_size: int = POOL_SIZE,
    bearer: str | None = None,
    idempotency: bool = False,
) -> list[bytes]:
    """Pre-encode ``pool_size`` complete HTTP/1.1 requests; key and payload vary across the pool.

    ``idempotency``: each carries ``Idempotency-Key: <KEY_DIGITS zeros>``, which ``Conn.send``
    overwrites with a new number per request (every request a new key, none a retry)."""
    rnd = random.Random(1234)
    alphabet = string.ascii_letters + string.digits
    pool: list[bytes] = []
    for i in range(pool_size):
        if scenario == "batch":
            msgs = ",".join(
                '{"content":"' + "".join(rnd.choices(alphabet, k=size)) + '"}' for _ in range(batch)
            )
            body = ('{"topic":"' + topic + '","messages":[' + msgs + "]}").encode()
            path = "/api/v1/messages/batch"
            extra = ""
        else:
            payload = "".join(rnd.choices(alphabet, k=size))
            body = json.dumps(
                {"topic": topic, "content": payload, "key": f"k{i}"}, separators=(",", ":")
            ).encode()
            path = "/api/v1/messages"
            extra = "Prefer: respond-async\r\n" if scenario == "produce-async" else ""
        if bearer:
            extra += f"Authorization: Bearer {bearer}\r\n"
        if idempotency:
            extra += f"{KEY_HEADER.decode()}{'0' * KEY_DIGITS}\r\n"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        pool.append(head + body)
    return pool


# --------------------------------------------------------------------------- connection


class Shared:
    """State shared by every connection of one run (one object, plain attributes)."""

    def __init__(self, pool: list[bytes], mode: str, pipeline: int, batch_check: bool) -> None:
        self.pool = pool
        self.mask = len(pool) - 1
        self.mode = mode
        self.pipeline = pipeline
        self.batch_check = batch_check
        self.running = True  # closed loop: keep sending
        self.measure_from = 0  # ns; responses to requests sent/intended before are not counted
        self.measure_to = 0  # ns; end of the window: ``in_window`` counts 2xx answered in it
        self.in_window = 0
        self.lag = array("q")  # open loop: µs between intended and actual send, when sent at once
        self.lat = array("q")  # latencies in µs, folded into ``hist`` by ``flush``
        self.hist = HdrHistogram(HIST_MIN_US, HIST_MAX_US, HIST_DIGITS)
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.partial = 0  # batch responses whose "failed" count is not 0
        self.inflight = 0
        self.pending: deque[int] = deque()  # open loop: intended times waiting for a connection
        self.idle: deque[Conn] = deque()  # open loop: one entry per free pipeline slot
        self.conns: list[Conn] = []
        # --idempotency-key: where each pooled request's key digits start, and the next key
        # (random high digits: a rerun against the same data never repeats one)
        self.key_at = [r.find(KEY_HEADER) + len(KEY_HEADER) for r in pool]
        self.keyed = KEY_HEADER in pool[0]
        self.next_key = random.randrange(10**KEY_DIGITS // 2)

    def flush(self) -> None:
        """Fold the buffered latencies into the HDR histogram (vectorised, off the hot path)."""
        lat = self.lat
        if not lat:
            return
        self.lat = array("q")

        values, counts = np.unique(np.frombuffer(lat, dtype=np.int64), return_counts=True)
        rec = self.hist.record_value
        for v, c in zip(values.tolist(), counts.tolist(), strict=True):
            rec(min(max(v, HIST_MIN_US), HIST_MAX_US), c)

    def error(self, kind: str, n: int = 1) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + n


class Conn(asyncio.Protocol):
    """One keep-alive connection. Parses only the status line and Content-Length framing."""

    def __init__(self, shared: Shared, index: int) -> None:
        self.s = shared
        self.idx = index & shared.mask
        self.transport: asyncio.Transport | None = None
        self.times: deque[int] = deque()  # send (closed) or intended (open) time per request
        self.buf = b""
        self.alive = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.alive = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        n = len(self.times)
        if n:
            self.s.error("conn", n)
            self.s.inflight -= n
            self.times.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, t: int) -> None:
        """Send the next pooled request; ``t`` is its intended time (open) or 0 (closed)."""
        s = self.s
        self.times.append(t or time.perf_counter_ns())
        req = s.pool[self.idx]
        if s.keyed:
            at = s.key_at[self.idx]
            s.next_key += 1
            req = b"%s%020d%s" % (req[:at], s.next_key, req[at + KEY_DIGITS :])
        self.transport.write(req)  # type: ignore[union-attr]
        self.idx = (self.idx + 1) & s.mask
        s.inflight += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        n = len(buf)
        s = self.s
        now = 0
        while True:
            h = buf.find(b"\r\n\r\n", pos)
            if h < 0:
                break
            head = buf[pos:h].lower()
            i = head.find(b"\r\ncontent-length:")
            if i < 0:
                # No Content-Length (chunked or close-delimited): not supported, drop the link.
                s.error("framing")
                self.transport.close()  # type: ignore[union-attr]
                self.buf = b""
                return
            j = head.find(b"\r\n", i + 17)
            end = h + 4 + int(head[i + 17 : j] if j > 0 else head[i + 17 :])
            if end > n:
                break
            status = int(buf[pos + 9 : pos + 12])
            if not now:
                now = time.perf_counter_ns()
            t0 = self.times.popleft()
            s.inflight -= 1
            if 200 <= status < 300 and s.measure_from <= now <= s.measure_to:
                s.in_window += 1  # achieved rate: whatever was intended, answered in the window
            if t0 >= s.measure_from:
                if 200 <= status < 300:
                    s.ok += 1
                    s.lat.append((now - t0) // 1000)
                    if s.batch_check:
                        k = buf.find(b'"failed":', h, end)
                        if k > 0 and buf[k + 9 : k + 11].strip(b" ")[:1] != b"0":
                            s.partial += 1
                else:
                    key = str(status)
                    s.errors[key] = s.errors.get(key, 0) + 1
            pos = end
            if s.mode == "closed":
                if s.running:
                    self.send(0)
            elif s.pending:
                self.send(s.pending.popleft())
            else:
                s.idle.append(self)
        self.buf = buf[pos:] if pos < n else b""


# --------------------------------------------------------------------------- run


async def connect(
    shared: Shared, host: str, port: int, count: int, timeout: float = 5.0
) -> list[Conn]:
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    for i in range(count):
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda i=i: Conn(shared, i * 7), host, port), timeout
        )
        conns.append(proto)
    return conns


async def run_load(args: argparse.Namespace, host: str, port: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pool = build_pool(
        f"{host}:{port}",
        args.scenario,
        args.size,
        args.batch,
        args.topic,
        POOL_SIZE,
        args.bearer,
        args.idempotency_key,
    )
    shared = Shared(pool, args.mode, args.pipeline, args.scenario == "batch")
    shared.conns = await connect(shared, host, port, args.connections)

    ticker: asyncio.TimerHandle | asyncio.Handle | None = None
    flusher: asyncio.TimerHandle | None = None

    def flush_tick() -> None:
        nonlocal flusher
        if len(shared.lat) >= FLUSH_AT:
            shared.flush()
        flusher = loop.call_later(0.25, flush_tick)

    flush_tick()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter_ns()
    warm_ns = int(args.warmup * 1e9)
    end_ns = start + warm_ns + int(args.duration * 1e9)
    shared.measure_from = start + warm_ns
    shared.measure_to = end_ns

    if args.mode == "closed":
        for c in shared.conns:
            for _ in range(args.pipeline):
                c.send(0)
    else:
        rate = float(args.rate)
        total = int((args.warmup + args.duration) * rate)
        issued = 0
        for c in shared.conns:
            shared.idle.extend([c] * args.pipeline)

        def tick() -> None:
            nonlocal issued, ticker
            now = time.perf_counter_ns()
            due = min(total, int((now - start) * rate / 1e9) + 1)
            idle = shared.idle
            pending = shared.pending
            lag_append = shared.lag.append
            while issued < due:
                intended = start + int(issued * 1e9 / rate)
                issued += 1
                while idle and not idle[0].alive:
                    idle.popleft()
                if idle:
                    idle.popleft().send(intended)
                    if intended >= shared.measure_from:
                        lag_append((time.perf_counter_ns() - intended) // 1000)
                else:
                    pending.append(intended)
            if issued >= total:
                ticker = None
                return
            delay = start + int(issued * 1e9 / rate) - time.perf_counter_ns()
            if delay > 2_000_000:  # libuv timers have 1 ms resolution: wake early, then spin
                ticker = loop.call_later((delay - 1_500_000) / 1e9, tick)
            else:
                ticker = loop.call_soon(tick)

        tick()

    # Reconnect lost connections while the run lasts.
    async def watch(c: Conn) -> None:
        while time.perf_counter_ns() < end_ns:
            await c.lost
            if time.perf_counter_ns() >= end_ns:
                return
            try:
                (new,) = await connect(shared, host, port, 1)
            except (TimeoutError, OSError):
                shared.error("connect")
                await asyncio.sleep(0.05)
                continue
            c = new
            shared.conns.append(c)
            if args.mode == "closed":
                for _ in range(args.pipeline):
                    c.send(0)
            else:
                for _ in range(args.pipeline):
                    if shared.pending:
                        c.send(shared.pending.popleft())
                    else:
                        shared.idle.append(c)

    watchers = [asyncio.ensure_future(watch(c)) for c in shared.conns]
    await asyncio.sleep(max(0.0, (end_ns - time.perf_counter_ns()) / 1e9))
    shared.running = False
    sent_end = time.perf_counter_ns()
    # Drain: answers still in flight (and, open loop, the queued backlog) up to --drain seconds.
    deadline = sent_end + int(args.drain * 1e9)
    while (shared.inflight or shared.pending) and time.perf_counter_ns() < deadline:
        await asyncio.sleep(0.005)
    if ticker is not None:
        ticker.cancel()
    if flusher is not None:
        flusher.cancel()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = (time.perf_counter_ns() - start) / 1e9
    if shared.inflight:
        shared.error("timeout", shared.inflight)
    if shared.pending:
        shared.error("unsent", len(shared.pending))
    for w in watchers:
        w.cancel()
    for c in shared.conns:
        if c.transport is not None:
            c.transport.abort()
    shared.flush()
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return summarize(args, shared, cpu / wall)


def percentile_curve(hist: HdrHistogram) -> list[tuple[float, int]]:
    """(percentile, µs) points, five per halving of the remaining tail (HdrHistogram style)."""
    total = hist.get_total_count()
    if not total:
        return []
    pts: list[tuple[float, int]] = []
    k = 0
    while True:
        p = 100.0 * (1.0 - 0.5 ** (k / 5))
        if p >= 100.0 * (1.0 - 1.0 / total) or k > 120:
            break
        pts.append((p, hist.get_value_at_percentile(p)))
        k += 1
    pts.append((100.0 * (1.0 - 1.0 / (2 * total)), hist.get_max_value()))
    return pts


def summarize(args: argparse.Namespace, shared: Shared, gen_cpu: float) -> dict[str, Any]:
    hist = shared.hist
    dur = args.duration
    batch = args.batch if args.scenario == "batch" else 1
    answered = shared.ok + sum(v for k, v in shared.errors.items() if k.isdigit())
    lat = {f"p{p:g}": hist.get_value_at_percentile(p) for p in PERCENTILES}
    lag = sorted(shared.lag)
    send_lag = (
        {"p50": lag[len(lag) // 2], "p99": lag[int(len(lag) * 0.99)], "max": lag[-1]}
        if lag
        else None
    )
    return {
        "url": args.url,
        "scenario": args.scenario,
        "mode": args.mode,
        "rate": args.rate if args.mode == "open" else None,
        "connections": args.connections,
        "pipeline": args.pipeline,
        "size": args.size,
        "batch": batch,
        "duration_s": dur,
        "warmup_s": args.warmup,
        "ok": shared.ok,
        "errors": dict(sorted(shared.errors.items())),
        "batch_partial": shared.partial,
        "req_per_s": shared.in_window / dur,
        "answered_per_s": answered / dur,
        "msg_per_s": shared.in_window * batch / dur,
        "send_lag_us": send_lag,
        "latency_us": {
            "min": hist.get_min_value() if shared.ok else 0,
            "mean": hist.get_mean_value() if shared.ok else 0,
            **lat,
            "max": hist.get_max_value(),
        },
        "gen_cpu": gen_cpu,
        "curve": percentile_curve(hist),
        "hdr": hist.encode().decode() if shared.ok else "",
    }


# --------------------------------------------------------------------------- output


def format_table(r: dict[str, Any]) -> str:
    lat = r["latency_us"]

    def ms(v: float) -> str:
        return f"{v / 1000:.3f}"

    errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
    target = f" target {r['rate']:g} req/s" if r["rate"] else ""
    lines = [
        f"{r['scenario']} {r['mode']}{target}, {r['connections']} connections, pipeline "
        f"{r['pipeline']}, {r['size']} B payload, batch {r['batch']}, {r['duration_s']:g} s "
        f"(+{r['warmup_s']:g} s warm-up) against {r['url']}",
        f"{'ok':>10} {'req/s':>10} {'msg/s':>11} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'p99.9 ms':>9} {'max ms':>9} {'gen_cpu':>8}",
        f"{r['ok']:>10} {r['req_per_s']:>10.0f} {r['msg_per_s']:>11.0f} {ms(lat['p50']):>8} "
        f"{ms(lat['p90']):>8} {ms(lat['p99']):>8} {ms(lat['p99.9']):>9} {ms(lat['max']):>9} "
        f"{r['gen_cpu'] * 100:>7.0f}%",
        f"errors: {errs}"
        + (f"; batch responses with failures: {r['batch_partial']}" if r["batch_partial"] else ""),
    ]
    if r["send_lag_us"]:
        g = r["send_lag_us"]
        lines.append(
            f"generator send lag (intended -> written, idle connection): p50 {g['p50']} µs, "
            f"p99 {g['p99']} µs, max {g['max']} µs"
        )
    return "\n".join(lines)


def plot_curves(
    series: Sequence[tuple[str, Sequence[Sequence[float]]]], path: str, title: str
) -> None:
    """Latency by percentile, x = 1/(1-p) on a log scale (HdrHistogram plotter style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    top = 2.0
    for label, curve in series:
        if not curve:
            continue
        xs = [1.0 / (1.0 - p / 100.0) for p, _ in curve]
        ys = [v / 1000.0 for _, v in curve]
        top = max(top, xs[-1])
        ax.plot(xs, ys, label=label, linewidth=1.6)
    ax.set_xscale("log")
    ys_all = [v for _, curve in series for _, v in curve if v > 0]
    if ys_all and max(ys_all) > 50 * min(ys_all):
        ax.set_yscale("log")  # servers an order of magnitude apart stay readable
    ticks = [1, 10, 100, 1_000, 10_000, 100_000, 1_000_000]
    names = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"]
    n = max(2, min(len(ticks), int(math.log10(top)) + 2))
    ax.set_xticks(ticks[:n], names[:n])
    ax.set_xlim(1, ticks[n - 1])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def create_topic(host: str, port: int, topic: str, bearer: str | None = None) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    try:
        conn.request(
            "POST",
            "/api/v1/topics",
            body=json.dumps({"name": topic, "partitions": 1}),
            headers=headers,
        )
        resp = conn.getresponse()
        resp.read()
        return str(resp.status)
    finally:
        conn.close()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8087")
    p.add_argument("--scenario", choices=SCENARIOS, default="produce")
    p.add_argument("--mode", choices=("open", "closed"), default="closed")
    p.add_argument("--rate", type=float, default=5000.0, help="open loop: requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent but not measured")
    p.add_argument("--drain", type=float, default=2.0, help="max seconds to wait for stragglers")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection")
    p.add_argument("--size", type=int, default=200, help="payload bytes per message")
    p.add_argument("--batch", type=int, default=100, help="messages per batch request")
    p.add_argument("--topic", default="bench")
    p.add_argument("--bearer", help="send 'Authorization: Bearer BEARER' with every request")
    p.add_argument(
        "--idempotency-key",
        action="store_true",
        help="send a new Idempotency-Key with every request (the cost of idempotent produce)",
    )
    p.add_argument("--admin-bearer", help="the token that creates the topic (default --bearer)")
    p.add_argument("--no-create-topic", action="store_true", help="skip POST /api/v1/topics")
    p.add_argument("--json", help="write the result as JSON to this file")
    p.add_argument("--plot", help="write the latency percentile distribution PNG to this file")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument(
        "--allow-remote", action="store_true", help="allow a non-loopback target (own hosts only)"
    )
    args = p.parse_args(argv)
    if args.connections < 1 or args.pipeline < 1 or args.duration <= 0 or args.rate <= 0:
        p.error("--connections, --pipeline, --duration and --rate must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    u = urlsplit(args.url)
    if u.scheme != "http" or not u.hostname:
        print(f"loadgen: only http://host:port URLs are supported: {args.url}", file=sys.stderr)
        return 2
    host, port = u.hostname, u.port or 80
    if not is_loopback(host) and not args.allow_remote:
        print(f"loadgen: {host} is not a loopback address (see --allow-remote)", file=sys.stderr)
        return 2
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        print(f"loadgen: server unreachable at {host}:{port}: {e}", file=sys.stderr)
        return 2
    if not args.no_create_topic:
        try:
            st = create_topic(host, port, args.topic, args.admin_bearer or args.bearer)
            if st not in ("200", "201") and not args.quiet:
                print(f"loadgen: warning: create topic answered {st}", file=sys.stderr)
        except (OSError, http.client.HTTPException) as e:
            print(f"loadgen: warning: create topic failed: {e}", file=sys.stderr)
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        result = asyncio.run(run_load(args, host, port))
    except (TimeoutError, OSError) as e:
        print(f"loadgen: cannot connect to {host}:{port}: {e!r}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        what = f"{args.mode} {args.rate:g} req/s" if args.mode == "open" else "closed loop"
        plot_curves(
            [(f"{args.scenario} ({what})", result["curve"])],
            args.plot,
            f"{args.url} {args.scenario}, {what}, {args.connections} connections",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

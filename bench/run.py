"""The whole comparison in one command: mqfast against FastAPI, aiohttp and a bare server.

What it measures
    For each server (mqfast, fastapi, aiohttp, bare) and each repetition: starts the server pinned
    to CPU 0 (``taskset -c 0``) on a free loopback port with a fresh temporary data directory,
    waits until it answers, creates the topic, warms it up, then runs ``bench/loadgen.py`` pinned
    to CPU 1 for each scenario:

    - ``open-5000``, ``open-10000``: produce, open loop at a fixed 5,000 / 10,000 req/s (latency
      from the intended send time, 64 connections), first, on a server in steady state;
    - ``closed-64``, ``closed-256``: produce, closed loop (maximum req/s) at 64 / 256 connections;
    - mqfast only: ``open-5000-after-burst`` (the fixed rate again, right after the closed-loop
      runs, while the embedded engine still checkpoints their WAL), ``async-256``
      (fire-and-forget, ``Prefer: respond-async``) and ``batch-100`` (100 messages per request,
      64 connections);
    - after all repetitions, ``consume-ack`` on a fresh mqfast (``bench/consume.py``);
    - ``wrk-64`` on bare and mqfast when ``wrk`` is installed: the same request with wrk, to check
      the generator against an independent one.

    During each run it samples the server's RSS (peak, process tree, from /proc) and CPU use, and
    for mqfast resets and reads ``/debug/gc`` (collections during the run, longest pause). Servers
    are stopped with SIGTERM (SIGKILL after a timeout) and repetitions are interleaved across
    servers so that machine noise hits all of them alike.

How to read the result
    ``bench/out/results.json`` has every run; ``bench/RESULTS.md`` is regenerated with medians
    (min–max) over the repetitions, the ratios mqfast ÷ fastapi / aiohttp / bare, GC figures and
    the generator check; ``bench/out/*.png`` plot the latency percentile distribution per server at
    each fixed rate, and p50/p99 against the offered rate. ``server_cpu`` near 100 % and
    ``gen_cpu`` clearly below it means the server was the limit, as it should be.

Run::

    .venv/bin/python bench/run.py --quick     # ~1-2 minute smoke: 1 repetition, short runs
    .venv/bin/python bench/run.py             # full: 3 repetitions, 10 s per measurement
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from loadgen import percentile_curve, plot_curves  # noqa: E402

SERVERS = ("mqfast", "fastapi", "aiohttp", "bare")
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK_LUA = """wrk.method = "POST"
wrk.path = "/api/v1/messages"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"topic":"bench","content":"' .. string.rep("a", %d) .. '","key":"k123"}'
"""


@dataclass
class Scenario:
    name: str
    args: list[str]  # loadgen arguments (without --url, --duration, --warmup)
    servers: tuple[str, ...]
    title: str
    rate: float | None = None
    wrk: bool = False


def scenarios(size: int) -> list[Scenario]:
    base = ["--size", str(size)]
    prod = ["--scenario", "produce", *base]
    # Fixed-rate latency first, on a server in steady state; saturating closed-loop runs leave
    # a checkpoint backlog behind them, whose effect has a scenario of its own below.
    open_5000 = [*prod, "--mode", "open", "--rate", "5000", "--connections", "64"]
    return [
        Scenario(
            "open-5000",
            open_5000,
            SERVERS,
            "produce, open loop 5,000 req/s, 64 connections (steady state)",
            rate=5000,
        ),
        Scenario(
            "open-10000",
            [*prod, "--mode", "open", "--rate", "10000", "--connections", "64"],
            SERVERS,
            "produce, open loop 10,000 req/s, 64 connections (steady state)",
            rate=10000,
        ),
        Scenario(
            "closed-64",
            [*prod, "--mode", "closed", "--connections", "64"],
            SERVERS,
            "produce, closed loop, 64 connections",
        ),
        Scenario(
            "closed-256",
            [*prod, "--mode", "closed", "--connections", "256"],
            SERVERS,
            "produce, closed loop, 256 connections",
        ),
        Scenario(
            "open-5000-after-burst",
            open_5000,
            ("mqfast",),
            "produce, open loop 5,000 req/s, right after the closed-loop runs on the same "
            "server (the embedded engine is still checkpointing their WAL)",
            rate=5000,
        ),
        Scenario(
            "async-256",
            ["--scenario", "produce-async", *base, "--mode", "closed", "--connections", "256"],
            ("mqfast",),
            "produce fire-and-forget (202), closed loop, 256 connections",
        ),
        Scenario(
            "batch-100",
            [
                "--scenario",
                "batch",
                "--batch",
                "100",
                *base,
                "--mode",
                "closed",
                "--connections",
                "64",
            ],
            ("mqfast",),
            "batch of 100 messages, closed loop, 64 connections",
        ),
        Scenario("wrk-64", [], ("mqfast", "bare"), "wrk -t1 -c64, same produce request", wrk=True),
    ]


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


class Sampler:
    """Peak RSS and busiest-second CPU use of a process tree, sampled every 0.1 s on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.cpu_peak = 0.0  # CPU seconds per second over the busiest 1 s window
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        samples: list[tuple[float, float]] = []
        while not self._stop.is_set():
            pids = proc_tree(self.pid)
            self.peak = max(self.peak, rss_bytes(pids))
            now, cpu = time.monotonic(), cpu_seconds(pids)
            samples.append((now, cpu))
            while len(samples) > 1 and now - samples[1][0] >= 1.0:
                samples.pop(0)
            if now - samples[0][0] >= 0.95:
                self.cpu_peak = max(self.cpu_peak, (cpu - samples[0][1]) / (now - samples[0][0]))
            self._stop.wait(0.1)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    data_dir: str
    log: Path
    debug_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    started: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def server_command(
    name: str, args: argparse.Namespace, port: int, data_dir: str
) -> tuple[list[str], dict[str, str], int | None]:
    env = dict(os.environ)
    py = sys.executable
    if name == "mqfast":
        dbg, metrics = free_port(), free_port()
        env.update(
            MESSAGE_QUEUE_DATA_DIR=data_dir,
            METRICS_ADDR=f"127.0.0.1:{metrics}",
            PPROF_ADDR=f"127.0.0.1:{dbg}",
        )
        return [*shlex.split(args.mqfast_cmd), "--port", str(port)], env, dbg
    script = {"fastapi": "fastapi_app.py", "aiohttp": "aiohttp_app.py", "bare": "bare.py"}[name]
    cmd = [py, str(BENCH / "baselines" / script), "--port", str(port), "--data-dir", data_dir]
    if name != "bare":
        cmd += ["--store", args.store]
    return cmd, env, None


def http_call(port: int, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stop(server: Server, timeout: float = 10.0) -> None:
    p = server.proc
    if p is None or p.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


@contextmanager
def running(server: Server, pin: bool, ready_timeout: float) -> Iterator[Server]:
    cmd = (["taskset", "-c", "0"] if pin else []) + server.cmd
    server.started = cmd
    with open(server.log, "ab") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n".encode())
        log.flush()
        server.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=server.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited with {server.proc.returncode}, see {server.log}"
                )
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} not ready after {ready_timeout} s") from None
                time.sleep(0.1)
        status, body = http_call(
            server.port, "POST", "/api/v1/topics", {"name": "bench", "partitions": 1}
        )
        if status not in (200, 201) and server.name != "bare":
            raise RuntimeError(f"{server.name}: create topic answered {status} {body[:200]!r}")
        yield server
    finally:
        stop(server)


def gc_collections(stats: dict[str, Any]) -> list[int]:
    """Collections per generation from /debug/gc (``generations`` list, or ``collections``)."""
    gens = stats.get("generations")
    if isinstance(gens, list) and gens and isinstance(gens[0], dict):
        return [int(g.get("collections", 0)) for g in gens]
    c = stats.get("collections", 0)
    return [int(x) for x in c] if isinstance(c, list) else [int(c)]


def gc_stats(server: Server, reset: bool = False) -> dict[str, Any] | None:
    if server.debug_port is None:
        return None
    try:
        status, body = http_call(
            server.debug_port, "GET", "/debug/gc" + ("?reset=1" if reset else "")
        )
        return json.loads(body) if status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None


# --------------------------------------------------------------------------- measurements


def loadgen_cmd(
    pin: bool, url: str, sc: Scenario, duration: float, warmup: float, out: Path
) -> list[str]:
    cmd = [sys.executable, str(BENCH / "loadgen.py"), "--url", url, *sc.args]
    cmd += ["--duration", f"{duration:g}", "--warmup", f"{warmup:g}", "--json", str(out), "--quiet"]
    return (["taskset", "-c", "1"] if pin else []) + cmd


def wrk_duration_us(text: str) -> float:
    for unit, mult in (("us", 1.0), ("ms", 1e3), ("s", 1e6), ("m", 60e6)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * mult
    return float(text)


def run_wrk(pin: bool, url: str, duration: float, lua: Path) -> dict[str, Any]:
    cmd = (["taskset", "-c", "1"] if pin else []) + [
        "wrk",
        "-t1",
        "-c64",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        str(lua),
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30).stdout
    res: dict[str, Any] = {"cmd": shlex.join(cmd), "req_per_s": 0.0, "errors": {}}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            res["req_per_s"] = float(parts[1])
        elif line.strip().startswith("99%"):
            res["latency_us"] = {"p99": wrk_duration_us(parts[1])}
        elif "Non-2xx" in line:
            res["errors"]["non-2xx"] = int(parts[-1])
        elif line.strip().startswith("Socket errors"):
            res["errors"]["socket"] = line.strip()
    res["ok"] = int(res["req_per_s"] * duration)
    return res


def measure(
    server: Server, sc: Scenario, args: argparse.Namespace, tmp: Path, rep: int, lua: Path
) -> dict[str, Any]:
    assert server.proc is not None
    pid = server.proc.pid
    gc_before = gc_stats(server, reset=True)
    cpu0, t0 = cpu_seconds(proc_tree(pid)), time.monotonic()
    with Sampler(pid) as sampler:
        if sc.wrk:
            res = run_wrk(args.pin, server.url, args.duration, lua)
        else:
            out = tmp / f"{server.name}-{sc.name}-{rep}.json"
            cmd = loadgen_cmd(args.pin, server.url, sc, args.duration, args.warmup, out)
            limit = args.duration + args.warmup + 40
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            if p.returncode != 0:
                raise RuntimeError(f"loadgen failed ({p.returncode}): {p.stderr.strip()[-500:]}")
            res = json.loads(out.read_text())
            res["cmd"] = shlex.join(cmd)
    wall = time.monotonic() - t0
    res["server_cpu_avg"] = (cpu_seconds(proc_tree(pid)) - cpu0) / wall
    res["server_cpu"] = sampler.cpu_peak
    res["rss_peak_bytes"] = sampler.peak
    gc_after = gc_stats(server)
    if gc_after is not None:
        after = gc_collections(gc_after)
        before = gc_collections(gc_before) if gc_before else [0] * len(after)
        res["gc"] = {
            "collections": [a - b for a, b in zip(after, before, strict=False)],
            "pause_max_s": gc_after.get("pause_max_s"),
            "pause_total_s": gc_after.get("pause_total_s"),
            "pauses": gc_after.get("pauses"),
            "allocated_blocks": gc_after.get("allocated_blocks"),
            "rss_bytes": gc_after.get("rss_bytes"),
        }
    return res


# --------------------------------------------------------------------------- report


def med(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"reps": len(runs)}
    out["req_per_s"] = med([r["req_per_s"] for r in runs])
    out["msg_per_s"] = med([r.get("msg_per_s", r["req_per_s"]) for r in runs])
    out["server_cpu"] = med([r["server_cpu"] for r in runs])
    out["rss_peak_mb"] = med([r["rss_peak_bytes"] / 2**20 for r in runs])
    out["errors"] = sum(v for r in runs for v in r["errors"].values() if isinstance(v, int))
    if "gen_cpu" in runs[0]:
        for k in ("p50", "p90", "p99", "p99.9", "max"):
            out[k + "_ms"] = med([r["latency_us"][k] / 1000 for r in runs])
        out["gen_cpu"] = med([r["gen_cpu"] for r in runs])
        lags = [r["send_lag_us"]["p99"] for r in runs if r.get("send_lag_us")]
        if lags:
            out["send_lag_p99_us"] = med(lags)
    out["rss_idle_mb"] = med([r.get("rss_idle_bytes", 0) / 2**20 for r in runs])
    gcs = [r["gc"] for r in runs if r.get("gc")]
    if gcs:
        out["gc_collections"] = [
            max(g["collections"][i] for g in gcs) for i in range(len(gcs[0]["collections"]))
        ]
        out["gc_pause_max_ms"] = max((g["pause_max_s"] or 0) * 1000 for g in gcs)
    return out


def fmt(t: tuple[float, float, float], spec: str = ",.0f") -> str:
    m, lo, hi = t
    return f"{m:{spec}} ({lo:{spec}}–{hi:{spec}})"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "mqfast",
        "uvloop",
        "httptools",
        "msgspec",
        "fastapi",
        "pydantic",
        "uvicorn",
        "aiohttp",
        "hdrhistogram",
        "numpy",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    wrk = shutil.which("wrk")
    if wrk:
        v = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        out["wrk"] = v.split(" [")[0].replace("wrk ", "")
    return out


def machine() -> dict[str, str]:
    model = "unknown"
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    return {"nproc": str(os.cpu_count()), "cpu": model, "memory": mem, "kernel": platform.release()}


def write_plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    from hdrh.histogram import HdrHistogram

    files = []
    rates: dict[str, list[tuple[float, float, float]]] = {}
    for sc in results["scenarios"]:
        if sc["rate"] is None:
            continue
        series = []
        for srv, runs in results["runs"].items():
            reps = runs.get(sc["name"], [])
            encoded = [r["hdr"] for r in reps if r.get("hdr")]
            if not encoded:
                continue
            hist = HdrHistogram.decode(encoded[0])
            for e in encoded[1:]:
                hist.add(HdrHistogram.decode(e))
            series.append(
                (
                    f"{srv} (p99 {hist.get_value_at_percentile(99) / 1000:.2f} ms)",
                    percentile_curve(hist),
                )
            )
            s = results["summary"][srv][sc["name"]]
            if not sc["name"].endswith("after-burst"):  # one point per rate: steady state
                rates.setdefault(srv, []).append((sc["rate"], s["p50_ms"][0], s["p99_ms"][0]))
        if series:
            path = out_dir / f"latency-{sc['name']}.png"
            plot_curves(series, str(path), f"{sc['title']}, all repetitions merged")
            files.append(path.name)
    if rates:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for srv, pts in rates.items():
            pts.sort()
            xs = [p[0] for p in pts]
            line = ax.plot(xs, [p[2] for p in pts], marker="o", label=f"{srv} p99")[0]
            ax.plot(
                xs,
                [p[1] for p in pts],
                marker=".",
                linestyle="--",
                color=line.get_color(),
                label=f"{srv} p50",
            )
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (req/s, open loop)")
        ax.set_ylabel("latency (ms, median of repetitions)")
        ax.grid(True, alpha=0.4)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "latency-vs-rate.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    return files


def generic(cmd: str) -> str:
    """A load command with its run-specific parts (port, paths) replaced by placeholders."""
    cmd = re.sub(r"http://127\.0\.0\.1:\d+", "http://127.0.0.1:PORT", cmd)
    cmd = re.sub(r"--json \S+", "--json OUT.json", cmd)
    return cmd.replace(str(ROOT) + "/", "")


def generator_note(summ: dict[str, Any]) -> str | None:
    """The load generator's own ceiling, from the bare server's closed-loop runs of this run."""
    bare = summ.get("bare", {})
    best = max(
        (bare[sc] for sc in ("closed-64", "closed-256") if sc in bare),
        key=lambda s: s["req_per_s"][2],
        default=None,
    )
    if best is None:
        return None
    rate, cpu = best["req_per_s"][2], best["gen_cpu"][2]
    note = (
        f"Load generator ceiling: against the bare server it reached {rate:,.0f} req/s (best run) "
        f"using up to {cpu:.0%} of its core, i.e. about {rate / max(cpu, 0.01):,.0f} req/s when "
        "CPU-bound"
    )
    if "wrk-64" in bare:
        note += f"; wrk on the same server: {bare['wrk-64']['req_per_s'][2]:,.0f} req/s (best run)"
    return note + ". Any server figure well below that is the server's, not the generator's."


def gen(s: dict[str, Any]) -> str:
    """Generator health: send lag p99 in open loop, its CPU use in closed loop."""
    if "send_lag_p99_us" in s:
        return f"lag p99 {s['send_lag_p99_us'][0]:.0f} µs"
    return f"CPU {s['gen_cpu'][0]:.0%}"


# Sections other scripts maintain (bench/kafka.py, bench/auth.py): <!-- name:begin --> ...
# <!-- name:end -->, kept as they are when this script rewrites the rest of the file.
_SECTION = re.compile(r"<!-- ([a-z0-9-]+):begin -->.*?<!-- \1:end -->", re.S)


def write_results(md: Path, text: str) -> None:
    """Write RESULTS.md, keeping the sections that bench/kafka.py and bench/auth.py maintain."""
    old = md.read_text() if md.exists() else ""
    keep = "".join("\n" + m.group(0) + "\n" for m in _SECTION.finditer(old))
    md.write_text(text + keep)


def render_md(results: dict[str, Any], plots: list[str]) -> str:
    m, v, a = results["machine"], results["versions"], results["args"]
    summ = results["summary"]
    lines = [
        "# Benchmark results",
        "",
        "Generated by `bench/run.py`; every figure below was measured in the run described here "
        "(see `bench/README.md` for how to read it). Medians over the repetitions, min–max in "
        "parentheses.",
        "",
        f"- Date: {results['date']}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Command: `{results['command']}`",
        f"- Repetitions: {a['reps']}, {a['duration']:g} s measured after {a['warmup']:g} s "
        f"warm-up per run, {a['size']} B payloads; baselines store with `--store {a['store']}`"
        + (
            " (no storage: answer on decode)"
            if a["store"] == "none"
            else " (mqfast's EmbeddedSink, fsync off)"
        ),
        f"- Pinning: {results['pinning']}",
    ]
    gnote = generator_note(summ)
    for note in [*results["notes"], *([gnote] if gnote else [])]:
        lines.append(f"- {note}")
    lines += ["", "## Server commands", ""]
    for srv, cmd in results["server_cmds"].items():
        lines.append(f"- {srv}: `{generic(cmd)}`")
    lines += ["", "## Figures", ""]
    for sc in results["scenarios"]:
        rows = [(srv, summ[srv][sc["name"]]) for srv in summ if sc["name"] in summ[srv]]
        if not rows:
            continue
        lines += [f"### {sc['name']}: {sc['title']}", ""]
        if sc["wrk"]:
            lines += ["| server | req/s | server CPU | peak RSS MB |", "|---|---|---|---|"]
            for srv, s in rows:
                lines.append(
                    f"| {srv} | {fmt(s['req_per_s'])} | {s['server_cpu'][0]:.0%} |"
                    f" {s['rss_peak_mb'][0]:.0f} |"
                )
        else:
            batch = sc["name"].startswith("batch")
            lines += [
                "| server | req/s |"
                + (" msg/s |" if batch else "")
                + " p50 ms | p99 ms | p99.9 ms | max ms | errors | server CPU | generator |"
                + " peak RSS MB |",
                "|---|---|" + ("---|" if batch else "") + "---|---|---|---|---|---|---|---|",
            ]
            for srv, s in rows:
                lines.append(
                    f"| {srv} | {fmt(s['req_per_s'])} |"
                    + (f" {fmt(s['msg_per_s'])} |" if batch else "")
                    + f" {fmt(s['p50_ms'], '.2f')} | {fmt(s['p99_ms'], '.2f')} |"
                    f" {s['p99.9_ms'][0]:.2f} |"
                    f" {s['max_ms'][0]:.1f} | {s['errors']} | {s['server_cpu'][0]:.0%} | {gen(s)} |"
                    f" {s['rss_peak_mb'][0]:.0f} |"
                )
        cmds = {
            generic(r["cmd"]) for runs in results["runs"].values() for r in runs.get(sc["name"], [])
        }
        lines += ["", "Load command" + ("s" if len(cmds) > 1 else "") + ":", ""]
        lines += [f"    {c}" for c in sorted(cmds)]
        lines.append("")
    consume = results.get("consume") or []
    if consume:
        tp = med([r["consumed_and_acked_per_s"] for r in consume])
        p50 = med([r["latency"]["p50_ms"] for r in consume])
        p99 = med([r["latency"]["p99_ms"] for r in consume])
        c0 = consume[0]
        lines += [
            "### consume-ack: consume and acknowledge over HTTP (bench/consume.py)",
            "",
            f"{c0['consumers']} consumers of one group, batches of {c0['batch']} (consume, then "
            f"one batch acknowledge), {c0['messages']:,} messages pre-filled over "
            f"{c0['partitions']} partitions; then single produces at {c0['latency']['rate']:g}/s"
            " with the consumers long-polling.",
            "",
            "| server | consumed + acked msg/s | produce→delivery p50 ms | p99 ms |",
            "|---|---|---|---|",
            f"| mqfast | {fmt(tp)} | {fmt(p50, '.2f')} | {fmt(p99, '.2f')} |",
            "",
            "Load command:",
            "",
            f"    {c0['cmd']}",
            "",
        ]
    if results["ratios"]:
        lines += ["## Ratios (medians, same run)", "", "| figure | ratio |", "|---|---|"]
        lines += [f"| {k} | {val:.2f}× |" for k, val in results["ratios"].items()]
        lines.append("")
    else:
        lines += ["## Ratios", "", "mqfast figures pending: no ratio yet.", ""]
    mem = [
        (
            srv,
            max(s["rss_idle_mb"][0] for s in by.values()),
            max(s["rss_peak_mb"][2] for s in by.values()),
        )
        for srv, by in summ.items()
    ]
    if mem:
        lines += [
            "## Memory (RSS of the server's process tree)",
            "",
            "| server | idle after start, MB (median) | peak under load, MB (max of all runs) |",
            "|---|---|---|",
        ]
        lines += [f"| {srv} | {idle:.0f} | {peak:.0f} |" for srv, idle, peak in mem]
        lines.append("")
    gc_rows = [(sc, s) for sc, s in summ.get("mqfast", {}).items() if "gc_pause_max_ms" in s]
    if gc_rows:
        lines += [
            "## mqfast garbage collector (from /debug/gc, worst repetition)",
            "",
            "| scenario | collections per generation | longest pause ms |",
            "|---|---|---|",
        ]
        lines += [
            f"| {sc} | {s['gc_collections']} | {s['gc_pause_max_ms']:.2f} |" for sc, s in gc_rows
        ]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p}](plots/{p})" for p in plots]
        lines.append("")
    return "\n".join(lines)


def publish_plots(plots: list[str], out_dir: Path) -> list[str]:
    """Copy the PNGs next to RESULTS.md (bench/plots/), which is committed with it."""
    dest = BENCH / "plots"
    dest.mkdir(exist_ok=True)
    for p in plots:
        shutil.copyfile(out_dir / p, dest / p)
    return plots


def measure_consume(
    args: argparse.Namespace, tmp: Path, out_dir: Path, live: list[Server]
) -> list[dict[str, Any]]:
    """bench/consume.py against a fresh pinned mqfast, once per repetition."""
    out: list[dict[str, Any]] = []
    for rep in range(args.reps):
        port = free_port()
        data_dir = str(tmp / f"consume-{rep}")
        os.makedirs(data_dir)
        cmd, env, dbg = server_command("mqfast", args, port, data_dir)
        srv = Server("mqfast", cmd, env, port, data_dir, out_dir / "logs" / "consume.log", dbg)
        live.append(srv)
        with running(srv, args.pin, args.ready_timeout):
            json_out = tmp / f"consume-{rep}.json"
            load = (["taskset", "-c", "1"] if args.pin else []) + [
                sys.executable,
                str(BENCH / "consume.py"),
                "--url",
                srv.url,
                "--messages",
                str(args.consume_messages),
                "--json",
                str(json_out),
            ]
            subprocess.run(load, check=True, stdout=subprocess.DEVNULL, timeout=600)
            r = json.loads(json_out.read_text())
            r["cmd"] = shlex.join(load).replace(str(port), "PORT").replace(str(tmp), "TMP")
            out.append(r)
            print(
                f"    consume+ack {r['consumed_and_acked_per_s']:>9,} msg/s  produce->delivery"
                f" p99 {r['latency']['p99_ms']:.2f} ms",
                flush=True,
            )
    return out


def ratios(summ: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    mq = summ.get("mqfast", {})
    for sc in ("closed-64", "closed-256"):
        if sc not in mq:
            continue
        for other in ("fastapi", "aiohttp", "bare"):
            o = summ.get(other, {}).get(sc)
            if o and o["req_per_s"][0]:
                out[f"{sc} req/s: mqfast ÷ {other}"] = mq[sc]["req_per_s"][0] / o["req_per_s"][0]
    if "async-256" in mq and summ.get("bare", {}).get("closed-256"):
        out["fire-and-forget 256 req/s: mqfast async ÷ bare closed-256"] = (
            mq["async-256"]["req_per_s"][0] / summ["bare"]["closed-256"]["req_per_s"][0]
        )
    bare = summ.get("bare", {})
    if "closed-64" in bare and "wrk-64" in bare and bare["wrk-64"]["req_per_s"][0]:
        out["generator check, bare 64 connections: loadgen ÷ wrk"] = (
            bare["closed-64"]["req_per_s"][0] / bare["wrk-64"]["req_per_s"][0]
        )
    return out


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mqfast vs baselines, one command")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 2 s runs")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per run")
    p.add_argument("--size", type=int, default=200, help="payload bytes")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    p.add_argument("--scenarios", default="", help="comma-separated subset (default: all)")
    p.add_argument("--mqfast-cmd", default=str(ROOT / ".venv/bin/mqfast") + " serve")
    p.add_argument(
        "--store",
        choices=("auto", "embedded", "none"),
        default="auto",
        help="baselines' storage; auto = embedded when src/mqfast/sinks/embedded.py exists",
    )
    p.add_argument("--no-wrk", action="store_true", help="skip the wrk cross-check")
    p.add_argument("--no-consume", action="store_true", help="skip the consume+ack scenario")
    p.add_argument("--consume-messages", type=int, default=100_000)
    p.add_argument("--out", default=str(BENCH / "out"))
    p.add_argument("--results-md", default=str(BENCH / "RESULTS.md"))
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rebuild the plots and RESULTS.md from OUT/results.json",
    )
    args = p.parse_args()
    if args.quick:
        args.reps, args.duration, args.warmup = 1, 2.0, 0.5
    if args.store == "auto":
        args.store = "embedded" if (ROOT / "src/mqfast/sinks/embedded.py").exists() else "none"
    args.pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    return args


def main() -> int:
    args = parse_args()
    command = shlex.join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out_dir / "results.json").read_text())
        plots = publish_plots(write_plots(results, out_dir), out_dir)
        write_results(Path(args.results_md), render_md(results, plots))
        print(f"wrote {args.results_md}, plots: {', '.join(plots) or 'none'}")
        return 0
    (out_dir / "logs").mkdir(exist_ok=True)
    if args.pin:
        os.sched_setaffinity(0, {1})  # this orchestrator stays off the server's core
    notes: list[str] = []
    wanted = [s for s in args.servers.split(",") if s]
    mq_bin = shlex.split(args.mqfast_cmd)[0]
    if "mqfast" in wanted and not (shutil.which(mq_bin) or Path(mq_bin).exists()):
        wanted.remove("mqfast")
        notes.append(f"mqfast figures pending: `{mq_bin}` does not exist yet.")
    all_sc = scenarios(args.size)
    if args.scenarios:
        keep = set(args.scenarios.split(","))
        all_sc = [s for s in all_sc if s.name in keep]
    if args.no_wrk or not shutil.which("wrk"):
        all_sc = [s for s in all_sc if not s.wrk]
        notes.append(
            "wrk cross-check skipped ("
            + ("--no-wrk" if args.no_wrk else "wrk not installed")
            + ")."
        )
    pinning = (
        "each server under `taskset -c 0` (its threads, e.g. the SQLite writer of the embedded "
        "engine, inherit CPU 0); loadgen, wrk and run.py on CPU 1 (`taskset -c 1`)"
        if args.pin
        else "none (fewer than 2 CPUs or no taskset): figures are not comparable"
    )
    lua = out_dir / "wrk-post.lua"
    lua.write_text(WRK_LUA % args.size)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in wanted}
    consume_runs: list[dict[str, Any]] = []
    server_cmds: dict[str, str] = {}
    failed: dict[str, str] = {}
    live: list[Server] = []

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="mqfast-bench-") as tmpname:
            tmp = Path(tmpname)
            for rep in range(args.reps):
                for name in wanted:
                    if name in failed:
                        continue
                    port = free_port()
                    data_dir = str(tmp / f"{name}-{rep}")
                    os.makedirs(data_dir)
                    cmd, env, dbg = server_command(name, args, port, data_dir)
                    srv = Server(
                        name, cmd, env, port, data_dir, out_dir / "logs" / f"{name}.log", dbg
                    )
                    live.append(srv)
                    print(
                        f"[{time.monotonic() - t_start:6.0f}s] rep {rep + 1}/{args.reps}"
                        f" {name}: start",
                        flush=True,
                    )
                    try:
                        with running(srv, args.pin, args.ready_timeout):
                            server_cmds[name] = (
                                shlex.join(srv.started)
                                .replace(str(port), "PORT")
                                .replace(data_dir, "DATA_DIR")
                            )
                            idle = rss_bytes(proc_tree(srv.proc.pid))  # type: ignore[union-attr]
                            # warm at the first scenario's fixed rate, not with a burst whose
                            # checkpoint backlog would still be draining when it is measured
                            warm = Scenario(
                                "warm",
                                [
                                    "--scenario",
                                    "produce",
                                    "--mode",
                                    "open",
                                    "--rate",
                                    "5000",
                                    "--connections",
                                    "64",
                                    "--size",
                                    str(args.size),
                                ],
                                (),
                                "",
                            )
                            measure(
                                srv,
                                warm,
                                argparse.Namespace(
                                    **{**vars(args), "duration": max(1.0, args.warmup), "warmup": 0}
                                ),
                                tmp,
                                rep,
                                lua,
                            )
                            for sc in all_sc:
                                if name not in sc.servers:
                                    continue
                                r = measure(srv, sc, args, tmp, rep, lua)
                                r["rss_idle_bytes"] = idle
                                runs[name].setdefault(sc.name, []).append(r)
                                lat = r.get("latency_us", {})
                                print(
                                    f"    {sc.name:<11} {r['req_per_s']:>9,.0f} req/s  p99 "
                                    f"{lat.get('p99', 0) / 1000:7.2f} ms  "
                                    f"errors {r['errors'] or '-'}  "
                                    f"server cpu {r['server_cpu']:.0%}",
                                    flush=True,
                                )
                    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                        failed[name] = str(e)
                        print(f"    {name} failed: {e}", file=sys.stderr, flush=True)
            if "mqfast" in wanted and "mqfast" not in failed and not args.no_consume:
                consume_runs = measure_consume(args, tmp, out_dir, live)
    finally:
        for srv in live:
            stop(srv)
    for name, why in failed.items():
        notes.append(f"{name} did not complete: {why}")
    summary = {srv: {sc: summarize(rs) for sc, rs in by.items()} for srv, by in runs.items() if by}
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "command": command,
        "args": {k: v for k, v in vars(args).items()},
        "pinning": pinning,
        "notes": notes,
        "server_cmds": server_cmds,
        "scenarios": [
            {"name": s.name, "title": s.title, "rate": s.rate, "wrk": s.wrk} for s in all_sc
        ],
        "runs": runs,
        "summary": summary,
        "ratios": ratios(summary),
        "consume": consume_runs,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    plots = publish_plots(write_plots(results, out_dir), out_dir)
    write_results(Path(args.results_md), render_md(results, plots))
    print(
        f"wrote {out_dir / 'results.json'}, {args.results_md}, plots: {', '.join(plots) or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Produce with ``--workers 2`` while Prometheus scrapes: two source trees side by side, in one run.

What it measures: for each tree (a directory with ``src/mqfast`` and a built ``_core``), a fresh
``mqfast serve --workers 2`` taking produce requests in open loop at ``--rate`` req/s from
``bench/loadgen.py`` (64 connections, 200-byte payloads) while ``/metrics`` is scraped every
second, the trees alternating run by run so that drift of a shared machine hits both alike.
Per run: 2xx req/s, p50/p99 latency, and the CPU time every process of the server used
(supervisor plus workers, from ``/proc``) per 10,000 requests; then, load stopped, the CPU time
of one scrape (the mean of 50 in a row).

How to read it: the CPU per 10,000 requests is the figure to trust on a loaded machine (it does
not depend on who else runs); latencies move with the load average. Made to check that serving
one merged ``/metrics`` per pod (the supervisor asks each worker at scrape time) costs the
produce path nothing; the compiled core is the same in both trees when no ``.pyx`` changed, so
an old tree can be ``git archive <commit> src | tar -x -C /tmp/old`` plus a copy of the ``.so``.

Run: ``.venv/bin/python bench/workers_ab.py --before /tmp/old --after . [--reps 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
SCRAPES = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pids: list[int]) -> float:
    """User plus system CPU seconds of ``pids`` so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def one_run(tree: Path, rate: float, duration: float) -> dict[str, Any]:
    data = tempfile.mkdtemp(prefix="workers-ab-")
    port, mport = free_port(), free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(tree / "src"),
        MESSAGE_QUEUE_WORKERS="2",
        MESSAGE_QUEUE_DATA_DIR=data,
        MESSAGE_QUEUE_PORT=str(port),
        METRICS_ADDR=f"127.0.0.1:{mport}",
        PPROF_ADDR="off",
    )
    with open(Path(data) / "server.log", "w") as log:
        srv = subprocess.Popen(
            [sys.executable, "-m", "mqfast.cli", "serve"], env=env, stdout=log, stderr=log
        )
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 90  # a loaded machine starts slowly
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or srv.poll() is not None:
                    tail = (Path(data) / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"{tree}: the server did not start:\n{tail}") from None
                time.sleep(0.1)
        time.sleep(1.0)  # both workers up
        me = srv.pid
        pids = [me, *map(int, Path(f"/proc/{me}/task/{me}/children").read_text().split())]

        def scrape() -> None:
            while not stop.wait(1.0):
                urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        out = Path(data) / "result.json"
        before = cpu_s(pids)
        load = [sys.executable, str(BENCH / "loadgen.py"), "--url", f"http://127.0.0.1:{port}"]
        load += ["--mode", "open", "--rate", str(rate), "--duration", str(duration)]
        subprocess.run([*load, "--json", str(out), "--quiet"], check=True)
        used = cpu_s(pids) - before
        stop.set()
        scraper.join()
        # What a scrape itself costs the server, now that every route and topic has series.
        before = cpu_s(pids)
        for _ in range(SCRAPES):
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
        scrape_ms = (cpu_s(pids) - before) / SCRAPES * 1000
        r: dict[str, Any] = json.loads(out.read_text())
        return {
            "req_per_s": r["req_per_s"],
            "p50_us": r["latency_us"]["p50"],
            "p99_us": r["latency_us"]["p99"],
            "cpu_s_per_10k": used / r["ok"] * 10_000,
            "cpu_ms_per_scrape": scrape_ms,
        }
    finally:
        stop.set()
        srv.terminate()
        srv.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--rate", type=float, default=3000.0)
    p.add_argument("--duration", type=float, default=8.0)
    args = p.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for rep in range(args.reps):
        for name in runs:
            r = one_run(getattr(args, name).resolve(), args.rate, args.duration)
            runs[name].append(r)
            print(rep + 1, name, {k: round(v, 3) for k, v in r.items()}, flush=True)
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{name}: median", {k: round(v, 3) for k, v in med.items()})
    print(f"1-minute load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

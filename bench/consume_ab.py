"""Consume + acknowledge on the embedded engine: two builds side by side, in one run.

What it measures: ``bench/consume.py`` (4 consumers of one group, batches of 100, 100,000
messages pre-filled, then produce→delivery latency at 1,000 msg/s) against a fresh server of
each build, the builds alternating run by run so that drift of a shared machine hits both
alike. Each server runs under ``taskset -c 0`` (its SQLite threads inherit CPU 0), the load
under ``taskset -c 1``. The same client (this checkout's ``bench/consume.py``) drives both.

How to read it: the ratio after ÷ before is the figure to trust; absolute msg/s move from one
session to the next on a shared machine. A build is a checkout with its own ``.venv`` (made by
``make build``), e.g. ``git worktree add /tmp/base <commit> && make -C /tmp/base build``.

Run: ``.venv/bin/python bench/consume_ab.py --before /tmp/base --after . [--reps 3]``; with
``--results-md bench/RESULTS.md`` the section ``consume-ab`` there is replaced (bench/run.py
keeps it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
SECTION = re.compile(r"<!-- consume-ab:begin -->.*?<!-- consume-ab:end -->\n?", re.S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def git_describe(root: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    return out.stdout.strip()[:90]


def one_run(root: Path, messages: int) -> dict[str, Any]:
    data = tempfile.mkdtemp(prefix="consume-ab-")
    port = free_port()
    env = dict(
        os.environ,
        MESSAGE_QUEUE_DATA_DIR=data,
        METRICS_ADDR=f"127.0.0.1:{free_port()}",
        PPROF_ADDR=f"127.0.0.1:{free_port()}",
    )
    cmd = ["taskset", "-c", "0", str(root / ".venv/bin/mqfast"), "serve", "--port", str(port)]
    with open(Path(data) / "server.log", "w") as log:
        srv = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or srv.poll() is not None:
                    raise RuntimeError(f"{root}: the server did not start") from None
                time.sleep(0.1)
        out = Path(data) / "result.json"
        load = ["taskset", "-c", "1", sys.executable, str(BENCH / "consume.py")]
        load += ["--url", f"http://127.0.0.1:{port}", "--messages", str(messages)]
        subprocess.run([*load, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    finally:
        srv.terminate()
        srv.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def fmt(values: list[float], digits: int = 0) -> str:
    med = statistics.median(values)
    if digits == 0:
        return f"{med:,.0f} ({min(values):,.0f}–{max(values):,.0f})"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def render(builds: dict[str, Path], runs: dict[str, list[dict[str, Any]]], reps: int) -> str:
    rows = []
    for name, root in builds.items():
        rs = runs[name]
        rows.append(
            f"| {name} | `{git_describe(root)}` | "
            f"{fmt([r['consumed_and_acked_per_s'] for r in rs])} | "
            f"{fmt([r['latency']['p50_ms'] for r in rs], 2)} | "
            f"{fmt([r['latency']['p99_ms'] for r in rs], 2)} |"
        )
    med = {n: statistics.median(r["consumed_and_acked_per_s"] for r in runs[n]) for n in runs}
    load = os.getloadavg()[0]
    return "\n".join(
        [
            "<!-- consume-ab:begin -->",
            "## Consume + acknowledge, two builds in one run (`bench/consume_ab.py`)",
            "",
            f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs "
            f"({cpu_model()}); 1-minute load average {load:.1f} at the end (figures of other "
            "sections may come from another machine: compare within a section)",
            f"- {reps} runs per build, builds alternating, a fresh server each run "
            "(`taskset -c 0 .venv/bin/mqfast serve`, embedded engine); load "
            "`taskset -c 1 bench/consume.py --messages 100000` (4 consumers, batches of 100, "
            "then single produces at 1,000/s while the consumers long-poll)",
            "",
            "| build | commit | consumed + acked msg/s | produce→delivery p50 ms | p99 ms |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Ratio after ÷ before (medians): **{med['after'] / med['before']:.2f}×**.",
            "<!-- consume-ab:end -->",
            "",
        ]
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="checkout of the old build")
    p.add_argument("--after", type=Path, default=BENCH.parent, help="checkout of the new build")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--results-md", type=Path, help="replace the consume-ab section there")
    args = p.parse_args()
    builds = {"before": args.before.resolve(), "after": args.after.resolve()}
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in builds}
    for rep in range(args.reps):
        for name, root in builds.items():
            r = one_run(root, args.messages)
            runs[name].append(r)
            print(
                f"{name} {rep}: {r['consumed_and_acked_per_s']:,} msg/s, produce->delivery"
                f" p50 {r['latency']['p50_ms']:.2f} p99 {r['latency']['p99_ms']:.2f} ms",
                flush=True,
            )
    section = render(builds, runs, args.reps)
    print(section)
    if args.results_md is not None:
        old = args.results_md.read_text()
        new = SECTION.sub(lambda _: section, old) if SECTION.search(old) else old + "\n" + section
        args.results_md.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Produce throughput of two builds side by side in one run, and the cost of an idempotency key.

What it measures: closed-loop produce (``loadgen.py``: single produce at 64 connections, and
batches of 100 at 64 connections) against a fresh embedded server of each build, in turn run
by run so that drift of a shared machine hits all alike: ``before`` and ``after`` without
keys (a change must not slow requests that do not use it), and ``after+key`` with a new
``Idempotency-Key`` on every request (``--idempotency-key``). Each server runs under
``taskset -c 0``, the generator under ``taskset -c 1``.

How to read it: medians of the runs with min–max; the ratios after ÷ before and after+key ÷
after of the same run are the figures to trust, not the absolute req/s. A build is a checkout
with its own ``.venv`` (``make build``), e.g.
``git worktree add --detach /tmp/base <commit> && make -C /tmp/base build``.

Run: ``.venv/bin/python bench/produce_ab.py --before /tmp/base --after . [--reps 5]``.
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
import time
from pathlib import Path
from typing import Any

from consume_ab import free_port, git_describe  # type: ignore[import-not-found]

BENCH = Path(__file__).resolve().parent
SCENARIOS = {"produce-64": ["--scenario", "produce"], "batch-100": ["--scenario", "batch"]}


def one_run(root: Path, scenario: str, keyed: bool, duration: float) -> dict[str, Any]:
    data = tempfile.mkdtemp(prefix="produce-ab-")
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
        load = ["taskset", "-c", "1", sys.executable, str(BENCH / "loadgen.py")]
        load += ["--url", f"http://127.0.0.1:{port}", "--mode", "closed", "--connections", "64"]
        load += [*SCENARIOS[scenario], "--duration", str(duration), "--warmup", "1", "--quiet"]
        load += ["--json", str(out)]
        if keyed:
            load.append("--idempotency-key")
        subprocess.run(load, check=True, stdout=subprocess.DEVNULL, timeout=duration + 120)
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    finally:
        srv.terminate()
        srv.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = p.parse_args()
    variants = [("before", args.before, False), ("after", args.after, False)]
    variants.append(("after+key", args.after, True))
    runs: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.reps):
        for scenario in args.scenarios.split(","):
            order = variants if rep % 2 == 0 else variants[::-1]
            for name, root, keyed in order:
                r = one_run(root.resolve(), scenario, keyed, args.duration)
                bad = sum(r["errors"].values()) + r["batch_partial"]
                if bad:
                    raise SystemExit(f"{name} {scenario}: errors {r['errors']}")
                runs.setdefault((scenario, name), []).append(r["msg_per_s"])
                print(f"rep {rep} {scenario:<11} {name:<10} {r['msg_per_s']:>10,.0f} msg/s")
    print(f"\nbefore: {git_describe(args.before)}\nafter:  {git_describe(args.after)}")
    print(f"{'scenario':<11} {'variant':<10} {'median msg/s (min-max)':>32}  ratio")
    for scenario in args.scenarios.split(","):
        med = {n: statistics.median(runs[(scenario, n)]) for n, _, _ in variants}
        for name, _, _ in variants:
            v = runs[(scenario, name)]
            base = "before" if name == "after" else "after" if name == "after+key" else name
            print(
                f"{scenario:<11} {name:<10} {med[name]:>14,.0f} ({min(v):,.0f}-{max(v):,.0f})"
                f"  {med[name] / med[base]:.3f}"
            )


if __name__ == "__main__":
    main()

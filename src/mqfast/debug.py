"""The debug listener on PPROF_ADDR: stacks, GC pauses, heap growth, CPU profiles.

Python's answer to the contract's ``/debug/pprof``. Everything here is off the hot path; the only
piece that is always on is the GC pause monitor, one ``gc.callbacks`` hook that costs two
``perf_counter`` calls per collection.

Routes: ``/debug/`` (index), ``/debug/stacks``, ``/debug/gc[?reset=1]``, ``/debug/heap?seconds=N``,
``/debug/profile?seconds=N&format=flamegraph|speedscope|raw`` (needs ``py-spy`` on PATH), and the
contract's ``/debug/pprof/profile`` and ``/debug/pprof/heap`` for the last two.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import io
import linecache
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from typing import Any

import msgspec

from mqfast.side import JSON, Handler, Response, error_response, serve_side

__all__ = ["gc_pause_totals", "gc_stats", "install_gc_monitor", "start_debug_server"]

log = logging.getLogger("mqfast.debug")

TEXT = "text/plain; charset=utf-8"
HEAP_DEFAULT_S, HEAP_MAX_S = 5, 60
PROFILE_DEFAULT_S, PROFILE_MAX_S = 10, 120
HEAP_TOP = 30
# Bounds the /debug/stacks answer on a gateway with tens of thousands of long-poll tasks.
MAX_TASK_STACKS = 200
_PROFILE_FORMATS = {
    "flamegraph": ("svg", "image/svg+xml"),
    "speedscope": ("json", JSON),
    "raw": ("txt", TEXT),
}


class _GcPauses:
    # count and total_s only grow (Prometheus counters); a reset of /debug/gc moves the base.
    __slots__ = ("base_count", "base_total_s", "count", "max_s", "started", "total_s")

    def __init__(self) -> None:
        self.started = 0.0
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self.base_count = 0
        self.base_total_s = 0.0


_pauses = _GcPauses()


def _on_gc(phase: str, info: dict[str, int]) -> None:
    # Runs inside every collection, in whichever thread triggered it: keep it to a few
    # attribute updates. Collections never nest, so one start timestamp suffices.
    if phase == "start":
        _pauses.started = time.perf_counter()
        return
    dt = time.perf_counter() - _pauses.started
    p = _pauses
    p.count += 1
    p.total_s += dt
    if dt > p.max_s:
        p.max_s = dt


def install_gc_monitor() -> None:
    """Start measuring every garbage collection's pause (idempotent; call at worker start)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def gc_stats(*, reset: bool = False) -> dict[str, Any]:
    """GC counters, pause totals since the last reset, and memory figures, as JSON-ready data.

    ``reset=True`` zeroes the pause counters (``pauses``, ``pause_total_s``, ``pause_max_s``)
    after reading them, so a benchmark can measure one run at a time.
    """
    gens = gc.get_stats()
    out: dict[str, Any] = {
        "generations": [
            {
                "generation": i,
                "collections": g["collections"],
                "collected": g["collected"],
                "uncollectable": g["uncollectable"],
            }
            for i, g in enumerate(gens)
        ],
        "collections": sum(g["collections"] for g in gens),
        "collected": sum(g["collected"] for g in gens),
        "uncollectable": sum(g["uncollectable"] for g in gens),
        "pauses": _pauses.count - _pauses.base_count,
        "pause_total_s": _pauses.total_s - _pauses.base_total_s,
        "pause_max_s": _pauses.max_s,
        "monitor_installed": _on_gc in gc.callbacks,
        "gc_enabled": gc.isenabled(),
        "gc_counts": list(gc.get_count()),
        "gc_thresholds": list(gc.get_threshold()),
        "frozen_objects": gc.get_freeze_count(),
        "garbage": len(gc.garbage),
        "allocated_blocks": sys.getallocatedblocks(),
        "rss_bytes": _rss_bytes(),
    }
    if reset:
        _pauses.base_count = _pauses.count
        _pauses.base_total_s = _pauses.total_s
        _pauses.max_s = 0.0
    return out


def gc_pause_totals() -> tuple[int, float]:
    """Collections measured and their pause seconds since the monitor started; never reset."""
    return _pauses.count, _pauses.total_s


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None  # not Linux
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _int_param(query: dict[str, str], key: str, default: int, hi: int) -> int | Response:
    raw = query.get(key)
    if raw is None or raw == "":
        return default
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 0 <= n <= hi:
        return error_response(400, "invalid_query", f"{key} must be an integer from 0 to {hi}")
    return n


def _stacks_text() -> str:
    buf = io.StringIO()
    threads = {t.ident: t for t in threading.enumerate()}
    frames = sys._current_frames()
    buf.write(f"pid {os.getpid()}, {len(frames)} threads\n")
    for ident, frame in sorted(
        frames.items(), key=lambda kv: kv[0] != threading.main_thread().ident
    ):
        t = threads.get(ident)
        name = t.name if t is not None else "?"
        daemon = " daemon" if t is not None and t.daemon else ""
        buf.write(f"\n--- thread {name} (ident {ident}{daemon}) ---\n")
        buf.writelines(traceback.format_stack(frame))
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:
        tasks = set()
    buf.write(f"\n=== asyncio: {len(tasks)} pending tasks ===\n")
    by_coro: dict[str, int] = {}
    for task in tasks:
        coro = task.get_coro()
        label = getattr(coro, "__qualname__", type(coro).__name__)
        by_coro[label] = by_coro.get(label, 0) + 1
    for label, n in sorted(by_coro.items(), key=lambda kv: -kv[1]):
        buf.write(f"{n:8d}  {label}\n")
    for i, task in enumerate(sorted(tasks, key=lambda t: t.get_name())):
        if i == MAX_TASK_STACKS:
            buf.write(f"\n... {len(tasks) - MAX_TASK_STACKS} more tasks not shown\n")
            break
        buf.write(f"\n--- task {task.get_name()} ---\n")
        task.print_stack(limit=20, file=buf)
    return buf.getvalue()


def _heap_report(snapshot: tracemalloc.Snapshot, seconds: int, was_tracing: bool) -> str:
    snapshot = snapshot.filter_traces(
        (
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
            tracemalloc.Filter(False, "<unknown>"),
        )
    )
    stats = snapshot.statistics("lineno")
    total = sum(s.size for s in stats)
    scope = (
        "all traced allocations still alive (tracemalloc was already on)"
        if was_tracing
        else f"allocations made during the last {seconds} s that are still alive"
    )
    lines = [f"Top {HEAP_TOP} allocation sites by size; {scope}.", f"Total: {_kib(total)}", ""]
    for i, st in enumerate(stats[:HEAP_TOP], 1):
        frame = st.traceback[0]
        lines.append(f"#{i}: {frame.filename}:{frame.lineno}: {_kib(st.size)} in {st.count} blocks")
        src = linecache.getline(frame.filename, frame.lineno).strip()
        if src:
            lines.append(f"    {src}")
    return "\n".join(lines) + "\n"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


# Yama's PR_SET_PTRACER: with kernel.yama.ptrace_scope=1 (the Ubuntu and most container host
# default) only ancestors may trace a process, and py-spy is our child, so we must invite it.
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1).value


def _set_ptracer(value: int) -> bool:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", "rb") as f:
            if f.read().strip() != b"1":
                return False
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PTRACER, ctypes.c_ulong(value), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class _Debug:
    """The route handlers; the busy flags allow one heap trace and one profile at a time."""

    def __init__(self) -> None:
        self._heap_busy = False
        self._profile_busy = False

    def routes(self) -> dict[str, Handler]:
        return {
            "/debug": self.index,
            "/debug/": self.index,
            "/debug/stacks": self.stacks,
            "/debug/gc": self.gc,
            "/debug/heap": self.heap,
            "/debug/profile": self.profile,
            # The contract's Go-style paths (``go tool pprof .../debug/pprof/profile``): the
            # same answers, in py-spy's and tracemalloc's formats, not pprof's protobuf.
            "/debug/pprof": self.index,
            "/debug/pprof/": self.index,
            "/debug/pprof/profile": self.profile,
            "/debug/pprof/heap": self.heap,
        }

    async def index(self, query: dict[str, str]) -> Response:
        # With --workers N each worker has its own listener (PPROF_ADDR's port + its index):
        # every answer is about this one process.
        text = (
            f"mqfast debug endpoints of process {os.getpid()}\n\n"
            "/debug/stacks                    every thread's stack and the asyncio tasks\n"
            "/debug/gc[?reset=1]              GC counts and pause times (JSON); reset=1 zeroes"
            " the pause counters after reporting\n"
            f"/debug/heap?seconds=N            top {HEAP_TOP} allocation sites of memory"
            f" allocated during N s (default {HEAP_DEFAULT_S}, max {HEAP_MAX_S})\n"
            "/debug/profile?seconds=N&format=flamegraph|speedscope|raw\n"
            f"                                 py-spy CPU profile (default {PROFILE_DEFAULT_S}"
            f" s, max {PROFILE_MAX_S})\n"
            "/debug/pprof/profile, /debug/pprof/heap   the contract's paths for the two above\n"
        )
        return 200, TEXT, text.encode()

    async def stacks(self, query: dict[str, str]) -> Response:
        return 200, TEXT, _stacks_text().encode()

    async def gc(self, query: dict[str, str]) -> Response:
        reset = query.get("reset", "") in ("1", "true", "yes")
        return 200, JSON, msgspec.json.encode(gc_stats(reset=reset))

    async def heap(self, query: dict[str, str]) -> Response:
        seconds = _int_param(query, "seconds", HEAP_DEFAULT_S, HEAP_MAX_S)
        if not isinstance(seconds, int):
            return seconds
        if self._heap_busy:
            return error_response(409, "conflict", "a heap trace is already running")
        self._heap_busy = True
        was_tracing = tracemalloc.is_tracing()
        try:
            if not was_tracing:
                tracemalloc.start()
            await asyncio.sleep(seconds)
            snapshot = tracemalloc.take_snapshot()
        finally:
            if not was_tracing:
                tracemalloc.stop()
            self._heap_busy = False
        # Grouping tens of thousands of traces takes a while; keep the loop answering meanwhile.
        report = await asyncio.to_thread(_heap_report, snapshot, seconds, was_tracing)
        return 200, TEXT, report.encode()

    async def profile(self, query: dict[str, str]) -> Response:
        seconds = _int_param(query, "seconds", PROFILE_DEFAULT_S, PROFILE_MAX_S)
        if not isinstance(seconds, int):
            return seconds
        seconds = max(seconds, 1)
        fmt = query.get("format") or "flamegraph"
        if fmt not in _PROFILE_FORMATS:
            return error_response(
                400, "invalid_query", "format must be flamegraph, speedscope or raw"
            )
        py_spy = shutil.which("py-spy")
        if py_spy is None:
            return error_response(
                501, "profiler_unavailable", "py-spy is not installed; pip install py-spy"
            )
        if self._profile_busy:
            return error_response(409, "conflict", "a profile is already running")
        self._profile_busy = True
        try:
            return await _run_py_spy(py_spy, seconds, fmt)
        finally:
            self._profile_busy = False


async def _run_py_spy(py_spy: str, seconds: int, fmt: str) -> Response:
    suffix, content_type = _PROFILE_FORMATS[fmt]
    fd, path = tempfile.mkstemp(prefix="mqfast-profile-", suffix=f".{suffix}")
    os.close(fd)
    invited = _set_ptracer(_PR_SET_PTRACER_ANY)
    try:
        proc = await asyncio.create_subprocess_exec(
            py_spy,
            "record",
            "--pid",
            str(os.getpid()),
            "--duration",
            str(seconds),
            "--format",
            fmt,
            "--native",
            "--nonblocking",
            "-o",
            path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            # py-spy needs a little time beyond the sampling window to write its output.
            async with asyncio.timeout(seconds + 30):
                _, stderr = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return error_response(503, "profiler_failed", "py-spy did not finish in time")
        with open(path, "rb") as f:
            body = f.read()
        if proc.returncode != 0 or not body:
            err = stderr.decode(errors="replace").strip()[-2000:]
            log.warning("py-spy failed", extra={"returncode": proc.returncode, "stderr": err})
            return error_response(
                503, "profiler_failed", f"py-spy exited with {proc.returncode}: {err}"
            )
        return 200, content_type, body
    finally:
        if invited:
            _set_ptracer(0)
        try:
            os.unlink(path)
        except OSError:
            pass


async def start_debug_server(host: str, port: int) -> asyncio.Server:
    """Serve the debug endpoints on ``host:port`` (PPROF_ADDR); also installs the GC monitor."""
    install_gc_monitor()
    return await serve_side(host, port, _Debug().routes(), name="debug")

"""The debug listener: GC pause tracking, stacks, heap, and the py-spy profile endpoint."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from mqfast import debug
from mqfast.debug import gc_stats, install_gc_monitor, start_debug_server


def test_gc_monitor_counts_forced_collections() -> None:
    install_gc_monitor()
    install_gc_monitor()
    assert gc.callbacks.count(debug._on_gc) == 1
    before = gc_stats()
    gc.collect()
    after = gc_stats()
    assert after["pauses"] > before["pauses"]
    assert after["pause_total_s"] >= before["pause_total_s"]
    assert after["pause_max_s"] > 0
    assert after["generations"][2]["collections"] > before["generations"][2]["collections"]


def test_gc_reset_zeroes_pause_counters_after_reporting() -> None:
    install_gc_monitor()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection may slip in between the reset and the check
    try:
        reported = gc_stats(reset=True)
        assert reported["pauses"] > 0
        cleared = gc_stats()
        assert cleared["pauses"] == 0
        assert cleared["pause_total_s"] == 0
        assert cleared["pause_max_s"] == 0
    finally:
        if enabled:
            gc.enable()


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split(" ")[1]), headers, body


def with_server(check: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await start_debug_server("127.0.0.1", 0)
        try:
            await check(int(server.sockets[0].getsockname()[1]))
        finally:
            server.close()
            await server.wait_closed()

    uvloop.run(main())


def test_index_stacks_and_gc_over_http() -> None:
    async def check(port: int) -> None:
        status, _, body = await get(port, "/debug/")
        assert status == 200
        for route in ("/debug/stacks", "/debug/gc", "/debug/heap", "/debug/profile"):
            assert route.encode() in body

        status, headers, body = await get(port, "/debug/stacks")
        assert status == 200
        assert headers["content-type"].startswith("text/plain")
        text = body.decode()
        assert "thread MainThread" in text
        assert "asyncio:" in text
        assert "test_debug.py" in text  # the main thread is running this test's loop

        gc.collect()
        status, headers, body = await get(port, "/debug/gc")
        assert status == 200
        assert headers["content-type"] == "application/json"
        stats = json.loads(body)
        for key in ("pause_max_s", "pause_total_s", "pauses", "allocated_blocks", "rss_bytes",
                    "gc_thresholds", "collected", "uncollectable", "generations"):  # fmt: skip
            assert key in stats, key
        assert stats["pauses"] >= 1
        assert len(stats["generations"]) == 3
        assert stats["rss_bytes"] is None or stats["rss_bytes"] > 0

        status, _, body = await get(port, "/debug/nope")
        assert status == 404

    with_server(check)


def test_heap_reports_allocation_sites() -> None:
    async def check(port: int) -> None:
        status, _, body = await get(port, "/debug/heap?seconds=0")
        assert status == 200
        assert body.startswith(b"Top 30 allocation sites")
        status, _, body = await get(port, "/debug/heap?seconds=61")
        assert status == 400
        assert json.loads(body)["error"]["code"] == "invalid_query"

    with_server(check)


def test_profile_without_py_spy_is_501(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)

    async def check(port: int) -> None:
        status, headers, body = await get(port, "/debug/profile?seconds=1")
        assert status == 501
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {
            "error": {
                "code": "profiler_unavailable",
                "message": "py-spy is not installed; pip install py-spy",
            }
        }
        status, _, _ = await get(port, "/debug/profile?format=pprof")
        assert status == 400

    with_server(check)


def test_the_contracts_pprof_paths_answer_as_their_python_twins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exe = fake_py_spy(
        tmp_path, 'while [ "$1" != "-o" ]; do shift; done\necho \'{"shared":{}}\' > "$2"\n'
    )
    monkeypatch.setattr(shutil, "which", lambda name: exe)

    async def check(port: int) -> None:
        status, _, body = await get(port, "/debug/pprof/heap?seconds=0")
        assert status == 200, body
        assert body.startswith(b"Top 30 allocation sites")
        status, headers, body = await get(port, "/debug/pprof/profile?seconds=1&format=speedscope")
        assert status == 200, body
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {"shared": {}}
        for index in ("/debug/pprof", "/debug/pprof/"):
            status, _, body = await get(port, index)
            assert status == 200
            assert b"/debug/pprof/profile" in body and b"/debug/pprof/heap" in body

    with_server(check)


def fake_py_spy(tmp_path: Path, script: str) -> str:
    path = tmp_path / "py-spy"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_profile_runs_py_spy_and_returns_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in that checks the arguments and writes to the -o file as py-spy would.
    args_file = tmp_path / "args"
    exe = fake_py_spy(
        tmp_path,
        f'echo "$@" > {args_file}\n'
        'while [ "$1" != "-o" ]; do shift; done\n'
        'echo \'{"shared":{}}\' > "$2"\n',
    )
    monkeypatch.setattr(shutil, "which", lambda name: exe)

    async def check(port: int) -> None:
        status, headers, body = await get(port, "/debug/profile?seconds=2&format=speedscope")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {"shared": {}}

    with_server(check)
    args = args_file.read_text().split()
    assert args[:3] == ["record", "--pid", str(os.getpid())]
    assert args[args.index("--duration") + 1] == "2"
    assert args[args.index("--format") + 1] == "speedscope"
    assert "--native" in args
    assert "--nonblocking" in args


def test_profile_failure_is_503_with_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exe = fake_py_spy(tmp_path, 'echo "Permission denied (os error 13)" >&2\nexit 1\n')
    monkeypatch.setattr(shutil, "which", lambda name: exe)

    async def check(port: int) -> None:
        status, _, body = await get(port, "/debug/profile?seconds=1&format=raw")
        assert status == 503
        err = json.loads(body)["error"]
        assert err["code"] == "profiler_failed"
        assert "Permission denied" in err["message"]

    with_server(check)

"""Baseline: the produce endpoint written plainly with aiohttp.web.

What it measures
    What a user gets writing ``POST /api/v1/messages`` the usual aiohttp way: ``json.loads`` of the
    body, hand-written validation (400 on a bad field), durable storage through mqfast's embedded
    engine (same engine and settings as mqfast: see ``_store.py``), and the same JSON answer as
    mqfast via ``web.json_response``. uvloop as the event loop, access log off. ``POST
    /api/v1/topics`` creates a topic (201, or 200 when it exists).

How to read the result
    Compare its req/s and latency with mqfast's in the same ``bench/run.py`` run; the goal is mqfast
    >= 5x its requests/s. ``--store none`` answers right after validation (no storage) and is only
    for development.

Run::

    taskset -c 0 .venv/bin/python bench/baselines/aiohttp_app.py --port 8089 --data-dir /tmp/ah
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import uvloop
from _store import Store
from aiohttp import web


def bad(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


def make_app(store: Store) -> web.Application:
    async def produce(request: web.Request) -> web.Response:
        try:
            data: Any = json.loads(await request.read())
        except ValueError:
            return bad("body is not JSON")
        if not isinstance(data, dict):
            return bad("body must be an object")
        topic, content, key = data.get("topic"), data.get("content"), data.get("key")
        if not isinstance(topic, str) or not topic:
            return bad("topic: a non-empty string is required")
        if not isinstance(content, str):
            return bad("content: a string is required")
        if key is not None and not isinstance(key, str):
            return bad("key: must be a string")
        if topic not in store.topics:
            return web.json_response({"error": "unknown topic"}, status=404)
        d = await store.produce(topic, key.encode() if key else None, content.encode())
        if d.error is not None:
            return web.json_response({"error": str(d.error)}, status=500)
        return web.json_response(store.response(d))

    async def create_topic(request: web.Request) -> web.Response:
        try:
            data: Any = json.loads(await request.read())
        except ValueError:
            return bad("body is not JSON")
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            return bad("name: a non-empty string is required")
        created = await store.create_topic(name)
        return web.json_response({"name": name, "partitions": 1}, status=201 if created else 200)

    async def on_startup(app: web.Application) -> None:
        await store.start()

    async def on_cleanup(app: web.Application) -> None:
        await store.close()

    app = web.Application()
    app.router.add_post("/api/v1/messages", produce)
    app.router.add_post("/api/v1/topics", create_topic)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description="aiohttp produce baseline")
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--data-dir", help="embedded engine data directory")
    p.add_argument("--store", choices=("embedded", "none"), default="embedded")
    args = p.parse_args()
    uvloop.install()
    web.run_app(
        make_app(Store(args.store, args.data_dir)),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()

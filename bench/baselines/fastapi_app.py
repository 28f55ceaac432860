"""Baseline: the produce endpoint written plainly with FastAPI + pydantic on uvicorn.

What it measures
    What a user gets writing ``POST /api/v1/messages`` the usual FastAPI way: a pydantic model of
    the request, a handler that stores the message durably through mqfast's embedded engine (same
    engine and settings as mqfast: see ``_store.py``) and returns the same JSON as mqfast. Served by
    uvicorn with uvloop + httptools, one worker, access log off. ``POST /api/v1/topics`` creates a
    topic (201, or 200 when it exists).

How to read the result
    Compare its req/s and latency with mqfast's in the same ``bench/run.py`` run; the goal is mqfast
    >= 10x its requests/s. ``--store none`` answers right after validation (no storage) and is
    only for development.

Run::

    taskset -c 0 .venv/bin/python bench/baselines/fastapi_app.py --port 8088 --data-dir /tmp/fa
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from _store import Store
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel


class ProduceRequest(BaseModel):
    topic: str
    content: str
    key: str | None = None


class CreateTopicRequest(BaseModel):
    name: str
    partitions: int = 1


def make_app(store: Store) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await store.start()
        yield
        await store.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/api/v1/messages")
    async def produce(req: ProduceRequest) -> dict[str, Any]:
        if req.topic not in store.topics:
            raise HTTPException(status_code=404, detail="unknown topic")
        key = req.key.encode() if req.key is not None else None
        d = await store.produce(req.topic, key, req.content.encode())
        if d.error is not None:
            raise HTTPException(status_code=500, detail=str(d.error))
        return store.response(d)

    @app.post("/api/v1/topics", status_code=201)
    async def create_topic(req: CreateTopicRequest, response: Response) -> dict[str, Any]:
        if not await store.create_topic(req.name):
            response.status_code = 200
        return {"name": req.name, "partitions": 1}

    return app


def main() -> None:
    p = argparse.ArgumentParser(description="FastAPI/uvicorn produce baseline")
    p.add_argument("--port", type=int, default=8088)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--data-dir", help="embedded engine data directory")
    p.add_argument("--store", choices=("embedded", "none"), default="embedded")
    args = p.parse_args()
    app = make_app(Store(args.store, args.data_dir))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()

"""A tiny HTTP/1.1 server for the side listeners (METRICS_ADDR, PPROF_ADDR).

Not on the hot path: a scrape every few seconds and an occasional debug request. So it favours
being small and obviously bounded over speed: GET (and HEAD) only, one request per connection
(``Connection: close``), the request head capped in size and in time and checked by the main
listener's rules (``_core.parse_request_head``), no request body read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

import msgspec

from mqfast._core import parse_request_head
from mqfast.errors import ErrorCode, MqfastError

__all__ = ["Handler", "Response", "error_response", "serve_side"]

Response = tuple[int, str, bytes]
"""``(status, content_type, body)`` as a handler returns it."""

Handler = Callable[[dict[str, str]], Awaitable[Response]]
"""Gets the parsed query string (last value wins for a repeated key); returns a Response."""

MAX_HEAD_BYTES = 16_384
# Long enough for a slow scraper on a loaded host, short enough that idle sockets do not pile up.
HEAD_TIMEOUT_S = 10.0
# After the answer, what the client still sends is read and dropped for this long (and this
# much) before closing, so the close does not reset the connection before the answer is read.
LINGER_S = 2.0
LINGER_BYTES = 1_048_576
JSON = "application/json"

log = logging.getLogger("mqfast.side")


def error_response(status: int, code: str, message: str) -> Response:
    """A JSON error in the API's shape: ``{"error": {"code": ..., "message": ...}}``."""
    return status, JSON, msgspec.json.encode({"error": {"code": code, "message": message}})


async def serve_side(
    host: str, port: int, routes: dict[str, Handler], *, name: str
) -> asyncio.Server:
    """Listen on ``host:port`` and answer GET requests for the exact paths in ``routes``.

    Unknown paths get 404, other methods 405, a malformed request 400, a head larger than 16 KiB
    431; a handler that raises gets 500 (and is logged). ``name`` labels the log lines. Port 0
    picks a free port (see ``server.sockets[0].getsockname()``). The caller closes the server.
    """
    table = dict(routes)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            resp, extra, head = await _respond(reader, table, name)
            if resp is not None:
                await _write(writer, resp, extra, head)
                await _linger(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    server = await asyncio.start_server(on_connection, host, port, limit=MAX_HEAD_BYTES)
    bound = server.sockets[0].getsockname() if server.sockets else (host, port)
    log.info(
        "side listener started",
        extra={"listener": name, "addr": f"{bound[0]}:{bound[1]}", "paths": sorted(table)},
    )
    return server


async def _respond(
    reader: asyncio.StreamReader, routes: dict[str, Handler], name: str
) -> tuple[Response | None, dict[str, str], bool]:
    """The answer, its extra headers, and whether the request was HEAD (no body)."""
    try:
        async with asyncio.timeout(HEAD_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    except TimeoutError:
        return None, {}, False
    except asyncio.IncompleteReadError as e:
        if not e.partial.strip():
            # connected and closed without a request (health probes, port scans)
            return None, {}, False
        return error_response(400, ErrorCode.MALFORMED_HTTP, "incomplete request head"), {}, False
    except asyncio.LimitOverrunError:
        return (
            error_response(
                431, ErrorCode.HEADERS_TOO_LARGE, f"request head exceeds {MAX_HEAD_BYTES} bytes"
            ),
            {},
            False,
        )
    try:
        raw_method, raw_target = parse_request_head(head, MAX_HEAD_BYTES)
    except MqfastError as e:
        return (e.status, JSON, e.to_body()), {}, False
    method, target = raw_method.decode("latin-1"), raw_target.decode("latin-1")
    try:
        url = urlsplit(target)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
    except ValueError:
        return error_response(400, ErrorCode.MALFORMED_HTTP, "malformed request target"), {}, False
    is_head = method == "HEAD"
    handler = routes.get(url.path)
    if handler is None:
        return error_response(404, ErrorCode.NOT_FOUND, f"no route for {url.path}"), {}, is_head
    if method != "GET" and not is_head:
        return (
            error_response(405, ErrorCode.METHOD_NOT_ALLOWED, f"{method} not allowed; use GET"),
            {"Allow": "GET, HEAD"},
            False,
        )
    try:
        return await handler(query), {}, is_head
    except Exception:
        log.exception("side handler failed", extra={"listener": name, "path": url.path})
        return (
            error_response(500, ErrorCode.INTERNAL, "internal error; see the server log"),
            {},
            is_head,
        )


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Shut down writing, then drop what the client still sends until it closes, LINGER_BYTES
    arrived or LINGER_S passed (nginx's lingering close): an unread request body or an
    oversized head would otherwise reset the connection and destroy the answer."""
    if not writer.can_write_eof():
        return
    writer.write_eof()
    left = LINGER_BYTES
    try:
        async with asyncio.timeout(LINGER_S):
            while left > 0:
                data = await reader.read(left)
                if not data:
                    return
                left -= len(data)
    except TimeoutError:
        pass


async def _write(
    writer: asyncio.StreamWriter, resp: Response, extra: dict[str, str], head: bool = False
) -> None:
    """Write ``resp``; for a HEAD request (``head``) the headers only, Content-Length kept."""
    status, content_type, body = resp
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    lines.extend(f"{k}: {v}" for k, v in extra.items())
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
    await writer.drain()

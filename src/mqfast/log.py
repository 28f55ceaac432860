"""Structured JSON log lines on stderr, in the shape of the API contract's example.

One line per record::

    {"level":"info","ts":"2024-01-01T12:00:00.123Z","logger":"mqfast.http","msg":"...", ...}

Fields given with ``logger.info("msg", extra={"topic": "x"})`` become top-level keys; an exception
adds ``"error"`` (its type and text) and ``"stack"`` (the formatted traceback). Loggers are named
``mqfast.<part>``. Nothing here runs on the hot path: the compiled core never logs per message.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from typing import Any, TextIO

import msgspec

__all__ = ["JsonFormatter", "configure_logging"]

# Zap's level names, so that lines from mqfast and the Go services it replaces read alike.
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "FATAL": logging.CRITICAL,
}
_CORE_KEYS = ("level", "ts", "logger", "msg")
# Every attribute a bare LogRecord carries; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _fallback(obj: Any) -> Any:
    # A log call must never raise because a field is not JSON-native (a Path, a UUID, an enum
    # msgspec does not know, ...): the string form is what a reader wants anyway.
    return str(obj)


_encoder = msgspec.json.Encoder(enc_hook=_fallback)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; ``static`` fields (e.g. ``worker``) go on every line."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single JSON line (without the trailing newline)."""
        out: dict[str, Any] = {
            "level": _LEVEL_NAMES.get(record.levelno) or record.levelname.lower(),
            "ts": _timestamp(record),
            "logger": record.name,
            "msg": record.getMessage().rstrip("\n"),
        }
        out.update(self._static)
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key.startswith("_"):
                continue
            # A field named like a core key must not overwrite it (a line whose "level" is a
            # user value would break every log query), so it is kept under a prefixed name.
            out[f"field.{key}" if key in _CORE_KEYS else key] = value
        if record.exc_info and record.exc_info[0] is not None:
            exc = record.exc_info[1]
            out["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            out["stack"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["error"] = record.exc_text
        if record.stack_info:
            out.setdefault("stack", record.stack_info)
        try:
            return _encoder.encode(out).decode()
        except Exception as e:  # e.g. a dict with non-string keys msgspec cannot encode
            return _encoder.encode(
                {k: out[k] for k in _CORE_KEYS} | {"log_error": f"unencodable fields: {e}"}
            ).decode()


def _timestamp(record: logging.LogRecord) -> str:
    ms = int(record.msecs)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z"


class _MqfastHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so reconfiguring replaces it instead of adding."""


def configure_logging(
    level: str, *, worker: int | None = None, stream: TextIO | None = None
) -> None:
    """Send every log record (mqfast's and third-party libraries') as JSON lines to stderr.

    ``level`` is a name such as ``"INFO"`` or ``"debug"`` (``"warn"`` is accepted); an unknown
    name raises ``ValueError``. ``worker`` is added as a ``"worker"`` field on every line when
    several worker processes share one stderr. ``stream`` replaces stderr (tests). Calling this
    again replaces the previous configuration rather than duplicating lines.
    """
    levelno = _LEVELS.get(level.strip().upper())
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}; expected DEBUG, INFO, WARNING or ERROR")
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, _MqfastHandler):
            root.removeHandler(h)
            h.close()
    handler = _MqfastHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter({"worker": worker} if worker is not None else None))
    root.addHandler(handler)
    root.setLevel(levelno)
    # warnings.warn output would otherwise bypass the JSON format as plain text on stderr.
    logging.captureWarnings(True)

"""JSON log lines: the contract's shape, extra fields, exceptions, levels, reconfiguration."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqfast.log import configure_logging

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def _restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_line_has_contract_shape_and_extra_fields() -> None:
    buf = io.StringIO()
    configure_logging("INFO", stream=buf)
    logging.getLogger("mqfast.http").info(
        "Message produced", extra={"message_id": "msg-123", "topic": "user-events"}
    )
    (line,) = lines(buf)
    assert list(line)[:4] == ["level", "ts", "logger", "msg"]
    assert line["level"] == "info"
    assert TS.match(str(line["ts"]))
    assert line["logger"] == "mqfast.http"
    assert line["msg"] == "Message produced"
    assert line["message_id"] == "msg-123"
    assert line["topic"] == "user-events"
    assert "worker" not in line


def test_worker_field_levels_and_unencodable_values() -> None:
    buf = io.StringIO()
    configure_logging("warn", worker=3, stream=buf)
    log = logging.getLogger("mqfast.kafka")
    log.info("dropped: below the level")
    log.warning("slow broker %s", "b1", extra={"path": Path("/tmp/x"), "level": "user value"})
    log.error("boom")
    first, second = lines(buf)
    assert first["level"] == "warn"
    assert first["msg"] == "slow broker b1"
    assert first["worker"] == 3
    assert first["path"] == "/tmp/x"
    assert first["field.level"] == "user value"
    assert second["level"] == "error"


def test_exception_becomes_error_and_stack() -> None:
    buf = io.StringIO()
    configure_logging("debug", stream=buf)
    try:
        raise ValueError("bad offset")
    except ValueError:
        logging.getLogger("mqfast.groups").exception("commit failed", extra={"partition": 2})
    (line,) = lines(buf)
    assert line["level"] == "error"
    assert line["error"] == "ValueError: bad offset"
    assert "Traceback" in str(line["stack"])
    assert "raise ValueError" in str(line["stack"])
    assert line["partition"] == 2


def test_reconfiguring_replaces_handler() -> None:
    old, new = io.StringIO(), io.StringIO()
    configure_logging("info", stream=old)
    configure_logging("info", stream=new)
    logging.getLogger("mqfast.server").info("once")
    assert old.getvalue() == ""
    assert len(lines(new)) == 1


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("verbose")

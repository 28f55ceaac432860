"""The ``mqfast`` command's own errors: they name the option or variable at fault."""

from __future__ import annotations

import json
import logging

import pytest

from mqfast import cli

SECRET = "s" * 48


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_token_refuses_an_unknown_role_naming_the_allowed_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESSAGE_QUEUE_JWT_SECRET", SECRET)
    assert cli.main(["token", "--sub", "dev", "--role", "producer", "--role", "wizard"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert "--role 'wizard'" in out.err and "admin, producer, consumer" in out.err
    assert cli.main(["token", "--sub", "dev", "--role", "producer"]) == 0


@pytest.mark.parametrize("ttl", ["0", "0s"])
def test_token_ttl_of_zero_names_the_option(
    ttl: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESSAGE_QUEUE_JWT_SECRET", SECRET)
    assert cli.main(["token", "--sub", "dev", f"--ttl={ttl}"]) == 2
    err = capsys.readouterr().err
    assert f"--ttl {ttl!r}" in err and "ttl_s" not in err


def test_a_configuration_error_at_start_is_a_json_log_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESSAGE_QUEUE_TTL", "24")
    assert cli.main(["serve"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["level"] == "error" and line["msg"] == "invalid configuration"
    assert line["error"].startswith("MESSAGE_QUEUE_TTL='24'")

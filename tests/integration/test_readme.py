"""The README's examples, run top to bottom as a newcomer would, against a real server.

Every ```bash block that contains ``curl`` is taken in order; each curl command is run with
curl itself (installed from Debian's packages when missing, like the other services of the
tests) against a fresh ``mqfast serve`` on free ports (a stream, ``curl -N``, ends at its
``--max-time``). The README's hosts and ports become the
test server's, ``<jwt-token>`` a real development token, and ``<id from consume>``/``<id>``
the message ids of the last consume answer, one each, in order. Every command must answer 2xx;
where the README shows an answer, the real one must match it. A block the test cannot run
fails it, unless an HTML comment ``<!-- readme-test: skip (reason) -->`` right before it says
why.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mqfast.auth import make_token
from mqfast.config import Settings
from tests.backends import services
from tests.conftest import MakeServer, MqfastProcess

README = Path(__file__).resolve().parents[2] / "README.md"
_FENCE = re.compile(r"(<!--\s*readme-test:\s*(.*?)\s*-->\s*\n)?```(\w*)\n(.*?)```", re.S)
_SKIP = re.compile(r"skip \((.+)\)")
_ID_PLACEHOLDER = re.compile(r"<id from consume>|<id>")


@dataclass
class Block:
    line: int
    language: str
    text: str
    skip_reason: str | None


def blocks(readme: str) -> list[Block]:
    """The README's fenced blocks in order, with the skip reason of a marker before one."""
    out = []
    for m in _FENCE.finditer(readme):
        marker = m.group(2)
        reason = None
        if marker is not None:
            skip = _SKIP.fullmatch(marker)
            where = readme.count("\n", 0, m.start()) + 1
            assert skip, f"README line {where}: readme-test marker {marker!r} needs skip (reason)"
            reason = skip.group(1)
        line = readme.count("\n", 0, m.start(3)) + 1
        out.append(Block(line, m.group(3), m.group(4), reason))
    return out


def commands(block: Block) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block.text)
    return [c.strip() for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]


def curl_path() -> str:
    found = shutil.which("curl")
    if found is None:  # a fresh Debian has no curl; the tests install what they need
        services.apt_install(["curl"])
        found = shutil.which("curl")
    assert found, "curl is needed to run the README's examples"
    return found


class Newcomer:
    """Runs the README's commands against ``srv`` and keeps what later commands need."""

    def __init__(self, srv: MqfastProcess, curl: str, workdir: Path) -> None:
        self.srv = srv
        self.curl = curl
        self.workdir = workdir
        secret = "readme-" * 8
        self.token = make_token(Settings(jwt_secret=secret), "readme", ["admin"])
        self.ids: list[str] = []  # of the last consume answer, not yet handed to a placeholder
        self.answers: list[tuple[str, int, Any]] = []  # (url, status, answer)

    def fill(self, command: str) -> str:
        for port, mine in ((8087, self.srv.port), (9097, self.srv.metrics_port),
                           (6067, self.srv.pprof_port)):  # fmt: skip
            command = command.replace(f"http://localhost:{port}/", f"http://127.0.0.1:{mine}/")
        assert "localhost" not in command, f"a host the test does not know: {command}"
        command = command.replace("<jwt-token>", self.token)

        def next_id(m: re.Match[str]) -> str:
            assert self.ids, f"{m.group(0)} but no message id of a consume is left: {command}"
            return self.ids.pop(0)

        command = _ID_PLACEHOLDER.sub(next_id, command)
        leftover = re.search(r"<[a-z][a-z -]*>", command)
        assert leftover is None, f"placeholder {leftover.group(0)} not filled: {command}"
        return command

    def run(self, command: str) -> tuple[int, Any]:
        argv = shlex.split(self.fill(command))
        assert argv[0] == "curl", f"not a curl command: {command}"
        out = self.workdir / f"answer{len(self.answers)}"
        done = subprocess.run(
            [self.curl, "-sS", "--max-time", "60", "-o", str(out), "-w", "%{http_code}",
             *argv[1:]],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        # An endless stream (curl -N) is ended by its own --max-time: curl's exit code 28.
        stream = "-N" in argv and done.returncode == 28
        assert done.returncode == 0 or stream, f"{command}\ncurl failed: {done.stderr}"
        status = int(done.stdout)
        body = out.read_bytes()
        try:
            answer: Any = json.loads(body)
        except ValueError:
            answer = body.decode(errors="replace")
        url = next(a for a in argv if a.startswith(("http://", "https://")))
        if url.endswith("/api/v1/messages/consume") and isinstance(answer, dict):
            self.ids = [m["message_id"] for m in answer.get("messages", [])]
        self.answers.append((url, status, answer))
        return status, answer


def test_the_readme_runs_top_to_bottom(make_server: MakeServer, tmp_path: Path) -> None:
    readme = README.read_text()
    srv = make_server()
    newcomer = Newcomer(srv, curl_path(), tmp_path)
    ran = 0
    for block in blocks(readme):
        if "curl " not in block.text:
            continue
        assert block.language == "bash" or block.skip_reason is not None, (
            f"README line {block.line}: curl in a ```{block.language} block, which this test "
            "does not run: make it ```bash, or mark it <!-- readme-test: skip (reason) -->"
        )
        if block.skip_reason is not None:
            continue  # marked in the README, with the reason beside it
        for command in commands(block):
            status, answer = newcomer.run(command)
            assert 200 <= status < 300, f"README line {block.line}: {command}\n{status} {answer}"
            ran += 1
    assert ran >= 20, f"only {ran} README commands found"

    # The README shows the answer to the first produce: the same fields, topic, partition and
    # offset (a fresh server), and a time-ordered id.
    shown = json.loads(next(b.text for b in blocks(readme) if b.language == "json"))
    first = next(a for url, _, a in newcomer.answers if url.endswith("/api/v1/messages"))
    assert set(first) == set(shown), first
    for key in ("topic", "partition", "offset"):
        assert first[key] == shown[key], (key, first)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        first["message_id"]), first  # fmt: skip
    assert isinstance(first["timestamp"], int)


def test_the_readme_error_example_is_what_the_server_answers(make_server: MakeServer) -> None:
    readme = README.read_text()
    m = re.search(r"a priority of 12 gives `400`\n`(\{.*?\})`\.", readme)
    assert m, "the README's error example moved"
    srv = make_server()
    r = srv.request("POST", "/api/v1/messages", {"topic": "test", "content": "x", "priority": 12})
    assert r.status == 400
    assert r.json() == json.loads(m.group(1))


def test_blocks_honour_a_skip_marker_only_with_a_reason() -> None:
    text = (
        "<!-- readme-test: skip (needs auth) -->\n```bash\ncurl http://localhost:8087/x\n```\n"
        "```bash\ncurl http://localhost:8087/y \\\n  -d '{}'\n# note\n```\n"
    )
    first, second = blocks(text)
    assert first.skip_reason == "needs auth" and second.skip_reason is None
    assert commands(second) == ["curl http://localhost:8087/y -d '{}'"]
    with pytest.raises(AssertionError, match="readme-test"):
        blocks("<!-- readme-test: skip -->\n```bash\ncurl x\n```\n")

"""Schemathesis over the served OpenAPI document, against a running gateway of each engine.

All four phases (the document's examples, coverage of boundaries and invalid values, random
fuzzing, and the stateful phase that follows the document's links: create topic -> get/delete
topic, produce -> consume -> acknowledge/extend, register consumer -> get/heartbeat/delete)
with every check: no 5xx, status codes, content types, headers and bodies as documented, a
valid request accepted and an invalid one refused. The run is the schemathesis command line
(the runner of all four phases; its pytest integration runs only the generated-examples
phase), deterministic, bounded by a number of examples per operation and a wall-clock cap. The
rules the document can only state in prose are applied to the generated requests by
``schemathesis_hooks.py``.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conformance.conftest import GatewayFactory

ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = 20  # per operation and phase
# Wall-clock cap of one run (about 30-45 s here when idle, 2 min on the loaded 2-core machine).
# Not schemathesis' --max-time: with it, fuzzing and stateful testing repeat until it is spent.
BUDGET_S = 240


@pytest.mark.timeout(BUDGET_S + 60)
def test_schemathesis(gateway: GatewayFactory, tmp_path: Path) -> None:
    # The long polls of the stateful phase are cut short by the hooks; keep leases long enough
    # that a linked acknowledge finds its lease on a loaded machine.
    # A master key, so that topics may be created encrypted.
    key = base64.b64encode(bytes(range(32))).decode()
    gw = gateway.start(
        MESSAGE_QUEUE_VISIBILITY_TIMEOUT="30s", MESSAGE_QUEUE_MASTER_KEYS=f"k1:{key}"
    )
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.conformance.schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{gw.proc.base_url}/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--generation-deterministic",
        "--workers", "1",
        "--request-timeout", "20",
        # A hang detector, not a performance test: a topic created on the fly by Kafka on a
        # loaded machine takes seconds (schemathesis' default limit is 10 s).
        "--max-response-time", "60",
        "--continue-on-failure",
        # Schemathesis reads every answer to its end, and a valid request to the stream route
        # is by design an answer that does not end (Server-Sent Events until the client
        # leaves): each would hang until --request-timeout. Its 400s, 404 and 409 are checked
        # against the document by test_openapi.py and tests/conformance/test_stream.py.
        "--exclude-operation-id", "streamMessages",
        "--no-color",
        "--report", "junit",
        "--report-dir", str(tmp_path),
    ]  # fmt: skip
    try:
        run = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BUDGET_S
        )
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        pytest.fail(f"schemathesis took more than {BUDGET_S}s ({gw.engine}):\n{partial[-8000:]}")
    out = run.stdout + run.stderr
    print(out[-4000:])  # the summary: phases, operations and cases tested (shown with -s)
    assert run.returncode == 0, f"schemathesis found failures ({gw.engine}):\n{out[-25000:]}"
    assert "✅  Stateful" in out and re.search(r"\s[1-9]\d* generated", out), out[-5000:]

"""A bounded, seeded run of the atheris fuzz target ``fuzz_http.py`` over the HTTP protocol.

The target runs in a child process (libFuzzer owns the process it fuzzes and exits when done),
from the seed corpus of valid requests and a dictionary of HTTP and JSON tokens, with a fixed
seed and number of runs, and a wall-clock cap under load. A failure prints the input that
caused it (also written as ``crash-*`` in the test's temporary directory); turn it into a
plain regression test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = 20_000
MAX_TOTAL_TIME_S = 50


@pytest.mark.timeout(MAX_TOTAL_TIME_S + 60)
def test_fuzz_http_protocol(tmp_path: Path) -> None:
    corpus, dictionary = tmp_path / "corpus", tmp_path / "http.dict"
    # The corpus and dictionary come from the target itself (a child: the target instruments
    # mqfast's modules when it imports them, which must not happen in this process).
    prepare = (
        "import sys; from pathlib import Path; from tests.unit import fuzz_http as f; "
        "f.seed_corpus(Path(sys.argv[1])); f.write_dictionary(Path(sys.argv[2]))"
    )
    subprocess.run(
        [sys.executable, "-c", prepare, str(corpus), str(dictionary)],
        cwd=ROOT, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    run = subprocess.run(
        [
            sys.executable, "-m", "tests.unit.fuzz_http",
            f"-runs={RUNS}", "-seed=1", f"-max_total_time={MAX_TOTAL_TIME_S}",
            "-max_len=4096", "-timeout=10", "-rss_limit_mb=2048",
            f"-dict={dictionary}", f"-artifact_prefix={tmp_path}/", str(corpus),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=MAX_TOTAL_TIME_S + 50,
    )  # fmt: skip
    out = run.stdout + run.stderr
    print(out[-1500:])  # how far it got (runs, coverage), shown with -s
    assert run.returncode == 0, f"the fuzz target failed:\n{out[-12000:]}"
    assert "Done " in out, out[-3000:]

"""Smoke test of ``make bench``: the harness runs end to end on tiny data in one rep.

Proves that ``bench/bench.py --quick`` generates its datasets, starts DCMTK and
the node, counts what arrived, and writes results.md and results.jsonl. It
checks completeness, not speed: figures from tiny transfers mean nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_tool

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def test_bench_quick_run_completes_and_writes_results(tmp_path: Path) -> None:
    require_tool("storescu")
    require_tool("storescp")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "bench.py"),
        "--quick",
        "--reps",
        "1",
        "--datasets",
        "small,rt",
        "--conc-datasets",
        "small",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cases = {(r["section"], r["dataset"], r["case"]) for r in rows}
    assert ("RECEIVE", "small", "storescu->dicomnode") in cases
    assert ("FORWARD", "rt", "dicomnode send->storescp") in cases
    assert ("MEMORY", "big", "storescu->dicomnode") in cases
    assert ("CONCURRENCY", "small", "4 storescu->dicomnode") in cases
    assert ("CONCURRENCY", "small", "4 storescu->storescp --fork (anchor)") in cases
    assert ("DELAYED", "small", "dicomnode send N=4->storescp") in cases
    assert ("DELAYED", "small", "dcmtk storescu->storescp") in cases
    assert all(r["ok"] and r["files_stored"] == r["files_expected"] for r in rows)
    assert all(r["receiver_rss_mb"] > 0 for r in rows)

    report = (out / "results.md").read_text()
    titles = ("### RECEIVE", "### FORWARD", "### MEMORY", "### CONCURRENCY", "### DELAYED")
    for title in (*titles, "### Targets"):
        assert title in report
    assert "All measurements complete." in report
    assert "- small: 4 senders vs 1: dicomnode " in report and "x, storescp --fork " in report
    assert "DELAYED link: " in report  # netem, or why not and the delay line instead

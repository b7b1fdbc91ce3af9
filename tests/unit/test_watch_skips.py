"""The forwarder says once why it will never send a file (hidden, temporary, reserved names)."""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

import pytest

from dicomnode.forwarder.watcher import Skipped, SkipReport, scan_folder, skip_reason
from dicomnode.storage import FOLDERS_LOCK, part_path


def _tree(root: Path) -> None:
    for rel in [
        "PAT1/study/series/CT_1.dcm",
        "PAT1/study/series/.hidden.dcm",
        "PAT1/study/series/copying.dcm.tmp",
        "PAT1/.stash/a.dcm",
        "loose.PART",
        "failed/20260101-000000_X/CT_9.dcm",
        ".dicomnode-state/x.json",
        "incoming/.convert-pending/j.json",
        "incoming/.convert-tmp/1-2/x.dcm",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / FOLDERS_LOCK).write_bytes(b"")
    part_path(root / "PAT1" / "study" / "series" / "CT_2.dcm").write_bytes(b"x")


def test_watch_skipped_entries_carry_their_reason(tmp_path: Path) -> None:
    _tree(tmp_path)
    skipped: list[Skipped] = []
    sent = {e.rel_path.as_posix() for e in scan_folder(tmp_path, skipped=skipped)}
    assert sent == {"PAT1/study/series/CT_1.dcm"}
    reasons = {s.rel_path.as_posix(): s.reason for s in skipped}
    # dicomnode's own bookkeeping and the parking folder are not reported
    assert set(reasons) == {
        "PAT1/study/series/.hidden.dcm",
        "PAT1/study/series/copying.dcm.tmp",
        "PAT1/.stash",
        "loose.PART",
    }
    assert "hidden folder" in reasons["PAT1/.stash"]
    assert "temporary" in reasons["loose.PART"]


def test_watch_skip_report_logs_each_entry_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _tree(tmp_path)
    report = SkipReport(tmp_path)
    caplog.set_level(logging.INFO, logger="dicomnode")
    for _ in range(3):
        skipped: list[Skipped] = []
        scan_folder(tmp_path, skipped=skipped)
        report.report(skipped)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("SKIPPED")]
    assert len(lines) == 4, lines
    assert sum(".hidden.dcm" in line for line in lines) == 1
    # gone, then back: reported again
    (tmp_path / "loose.PART").unlink()
    report.report([])
    report.report([Skipped(PurePosixPath("loose.PART"), "temporary file name")])
    assert sum("loose.PART" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize(
    ("rel", "is_dir", "reported"),
    [
        ("failed", True, False),
        ("failed", False, True),
        ("a/failed", True, False),
        (".x", True, True),
        (".dicomnode-state", True, False),
        ("a/b.tmp", False, True),
        ("a/b.tmp", True, False),
        ("a/CT_1.dcm", False, False),
    ],
)
def test_watch_skip_reason(rel: str, is_dir: bool, reported: bool) -> None:
    assert (skip_reason(PurePosixPath(rel), is_dir) is not None) == reported

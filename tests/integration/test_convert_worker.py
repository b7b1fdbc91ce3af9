"""ConversionWorker thread: markers, crash-resume, clean stop, original handling, emf2sf backend.

dcm4che is not installable here, so the emf2sf backend runs against fake ``emf2sf``
executables (Python scripts) that behave like the real tool's CLI.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomnode.config import DEFAULT_LAYOUT, ToolsConfig
from dicomnode.convert.native import frame_uid
from dicomnode.convert.worker import (
    PENDING_DIR,
    STAGING_DIR,
    ConversionWorker,
    convert_file,
    convert_paths,
    marker_path,
)
from dicomnode.errors import ConversionError
from dicomnode.organise import relative_path
from tests.conftest import REPO, wait_until
from tests.enhanced_factory import ENHANCED_MR_COLOR, ROOT, make_enhanced_mr, save

NATIVE = ToolsConfig(enhanced_mr_conversion="native")
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _store(ae_root: Path, **kwargs: object) -> Path:
    ds = make_enhanced_mr(**kwargs)  # type: ignore[arg-type]
    return save(ds, ae_root / relative_path(ds, DEFAULT_LAYOUT))


def _classic_files(root: Path) -> list[Path]:
    """Return the visible converted files (os.walk tolerates folders vanishing meanwhile)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder) / f for f in files if f.startswith("MR_2.25.")]
    return sorted(found)


@pytest.fixture
def workers() -> Iterator[list[ConversionWorker]]:
    started: list[ConversionWorker] = []
    yield started
    for worker in started:
        worker.stop(5.0)


def _worker(started: list[ConversionWorker], tools: ToolsConfig = NATIVE) -> ConversionWorker:
    worker = ConversionWorker(tools, DEFAULT_LAYOUT)
    started.append(worker)
    worker.start()
    return worker


def test_worker_converts_submitted_object_and_removes_marker(
    tmp_path: Path, workers: list[ConversionWorker], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "incoming"
    stored = _store(root)
    worker = _worker(workers)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        worker.submit(stored, root, ENHANCED_MR)
        assert wait_until(lambda: len(_classic_files(root)) == 4, 20)
        assert worker.wait_idle(60)
    assert not marker_path(stored, root).exists()
    assert not any((root / PENDING_DIR).glob("*.json"))
    assert stored.is_file()  # keep_enhanced_original defaults to true
    assert f"CONVERTED sop_instance_uid={ROOT}4.1 frames=4" in caplog.text


def test_worker_submit_writes_marker_before_returning(tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    stored = _store(root)
    worker = ConversionWorker(NATIVE, DEFAULT_LAYOUT)  # not started: the job waits
    worker.submit(stored, root, ENHANCED_MR)
    record = json.loads(marker_path(stored, root).read_text())
    assert root / record["path"] == stored
    assert record["sop_class_uid"] == ENHANCED_MR
    worker.stop(1.0)
    assert marker_path(stored, root).exists()  # stays for the next start


def test_worker_resumes_marker_left_by_a_crash(
    tmp_path: Path, workers: list[ConversionWorker]
) -> None:
    root = tmp_path / "incoming"
    stored = _store(root)
    crashed = ConversionWorker(NATIVE, DEFAULT_LAYOUT)
    crashed.submit(stored, root, ENHANCED_MR)  # marker written, never processed
    stale = root / STAGING_DIR / "deadbeef-0001" / "series"
    stale.mkdir(parents=True)
    (stale / "MR_half.dcm").write_bytes(b"partial")
    worker = _worker(workers)
    assert worker.resume([root, tmp_path / "no-such-root"]) == 1
    assert wait_until(lambda: len(_classic_files(root)) == 4, 20)
    assert worker.wait_idle(60)
    assert not marker_path(stored, root).exists()
    assert not any((root / STAGING_DIR).iterdir())  # the crashed run's staging is gone


def test_worker_resume_spares_live_sibling_processes(tmp_path: Path) -> None:
    """Each receiver process runs a worker; resume must not steal or wipe a sibling's work."""
    root = tmp_path / "incoming"
    live = root / STAGING_DIR / f"{os.getppid()}-abcdef-0001"
    live.mkdir(parents=True)
    worker = ConversionWorker(NATIVE, DEFAULT_LAYOUT)
    time.sleep(0.05)
    stored = _store(root)
    ConversionWorker(NATIVE, DEFAULT_LAYOUT).submit(stored, root, ENHANCED_MR)  # after start
    assert worker.resume([root]) == 0
    assert live.is_dir()
    assert marker_path(stored, root).exists()


def test_worker_deletes_original_only_when_configured(
    tmp_path: Path, workers: list[ConversionWorker]
) -> None:
    root = tmp_path / "incoming"
    stored = _store(root)
    worker = _worker(
        workers, ToolsConfig(enhanced_mr_conversion="native", keep_enhanced_original=False)
    )
    worker.submit(stored, root, ENHANCED_MR)
    assert wait_until(lambda: not stored.exists(), 20)
    assert len(_classic_files(root)) == 4
    # the emptied series folder is removed too (after the unlink and a folder fsync)
    assert wait_until(lambda: not stored.parent.exists(), 20)


def test_worker_ignores_off_and_unconvertible(
    tmp_path: Path, workers: list[ConversionWorker], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "incoming"
    stored = _store(root, sop_class=ENHANCED_MR_COLOR)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        _worker(workers).submit(stored, root, ENHANCED_MR_COLOR)
        _worker(workers).submit(stored, root, "1.2.840.10008.5.1.4.1.1.2")  # classic CT
        _worker(workers, ToolsConfig(enhanced_mr_conversion="off")).submit(
            stored, root, ENHANCED_MR
        )
    assert caplog.text.count("stored unconverted: no classic target") == 1
    assert not any((root / PENDING_DIR).glob("*.json"))


def test_worker_submit_never_raises(tmp_path: Path, workers: list[ConversionWorker]) -> None:
    blocker = tmp_path / "file-not-folder"
    blocker.write_bytes(b"")
    worker = _worker(workers)
    worker.submit(blocker / "x.dcm", blocker, ENHANCED_MR)  # marker folder cannot be made
    assert worker.wait_idle(60)


def test_worker_failed_conversion_keeps_original_and_drops_marker(
    tmp_path: Path, workers: list[ConversionWorker], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "incoming"
    ds = make_enhanced_mr()
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    stored = save(ds, root / relative_path(ds, DEFAULT_LAYOUT))
    worker = _worker(workers)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        worker.submit(stored, root, ENHANCED_MR)
        assert wait_until(lambda: "CONVERT-FAILED" in caplog.text, 20)
        assert worker.wait_idle(60)
    assert stored.is_file()
    assert _classic_files(root) == []
    assert not marker_path(stored, root).exists()


def test_worker_stop_abandons_job_and_keeps_marker(tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    stored = _store(root, frames=400, rows=64, cols=64)
    worker = ConversionWorker(NATIVE, DEFAULT_LAYOUT)
    worker.start()
    worker.submit(stored, root, ENHANCED_MR)
    time.sleep(0.05)
    worker.stop(10.0)
    if not marker_path(stored, root).exists():
        pytest.skip("conversion finished before stop; machine too fast for this check")
    assert _classic_files(root) == []  # nothing half-placed
    again = ConversionWorker(NATIVE, DEFAULT_LAYOUT)
    again.start()
    try:
        assert again.resume([root]) == 1
        assert wait_until(lambda: len(_classic_files(root)) == 400, 30)
    finally:
        again.stop(5.0)


# --------------------------------------------------------------------------- emf2sf backend

_FAKE = """#!{python}
import sys
sys.path.insert(0, {src!r})
args = sys.argv[1:]
mode = {mode!r}
if mode == "fail":
    print("Unsupported SOP Class", file=sys.stderr)
    sys.exit(2)
if mode == "hang":
    import time
    time.sleep(60)
out = args[args.index("--out-dir") + 1]
source = args[-1]
from pathlib import Path
from pydicom import dcmread
from dicomnode.convert.native import convert_dataset
for i, ds in enumerate(convert_dataset(dcmread(source))):
    ds.save_as(Path(out) / f"{{Path(source).name}}-{{i + 1:04d}}", enforce_file_format=True)
"""


def _fake_emf2sf(folder: Path, mode: str = "ok") -> Path:
    exe = folder / "bin" / "emf2sf"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(_FAKE.format(python=sys.executable, src=str(REPO / "src"), mode=mode))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


@pytest.mark.skipif(os.name == "nt", reason="fake emf2sf is a POSIX script")
def test_emf2sf_backend_places_tool_output(tmp_path: Path) -> None:
    dcm4che = tmp_path / "dcm4che-5"
    _fake_emf2sf(dcm4che)
    root = tmp_path / "incoming"
    stored = _store(root)
    for path_setting in (dcm4che, dcm4che / "bin", dcm4che / "bin" / "emf2sf"):
        tools = ToolsConfig(emf2sf_path=path_setting, enhanced_mr_conversion="emf2sf")
        result = convert_file(stored, root, tools, DEFAULT_LAYOUT)
        assert result.frames == 4
        names = sorted(p.name for p in _classic_files(root))
        assert names == sorted(f"MR_{frame_uid(ROOT + '4.1', i)}.dcm" for i in range(1, 5))
    assert dcmread(_classic_files(root)[0]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"


@pytest.mark.skipif(os.name == "nt", reason="fake emf2sf is a POSIX script")
@pytest.mark.parametrize(("mode", "reason"), [("fail", "exited with 2"), ("hang", "timed out")])
def test_emf2sf_backend_failure_keeps_original(
    tmp_path: Path,
    workers: list[ConversionWorker],
    caplog: pytest.LogCaptureFixture,
    mode: str,
    reason: str,
) -> None:
    exe = _fake_emf2sf(tmp_path / "dcm4che", mode)
    root = tmp_path / "incoming"
    stored = _store(root)
    tools = ToolsConfig(emf2sf_path=exe, enhanced_mr_conversion="emf2sf", emf2sf_timeout_s=1.0)
    with pytest.raises(ConversionError, match=reason):
        convert_file(stored, root, tools, DEFAULT_LAYOUT)
    worker = _worker(workers, tools)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        worker.submit(stored, root, ENHANCED_MR)
        assert wait_until(lambda: "CONVERT-FAILED" in caplog.text, 20)
    assert reason in caplog.text
    assert stored.is_file()
    assert _classic_files(root) == []
    assert not any((root / STAGING_DIR).iterdir())


def test_emf2sf_backend_missing_tool_fails_cleanly(tmp_path: Path) -> None:
    source = save(make_enhanced_mr(), tmp_path / "in" / "enh.dcm")
    tools = ToolsConfig(emf2sf_path=tmp_path / "nowhere", enhanced_mr_conversion="emf2sf")
    assert convert_paths([source], tmp_path / "out", tools, DEFAULT_LAYOUT) == 1
    assert not any((tmp_path / "out").rglob("*.dcm"))

"""RT completeness before sending, against DCMTK storescp on 127.0.0.1.

A dose and plan without their structure set are held (one ``WAITING`` line, nothing at
the target) until the structure set is dropped into the group, then all three arrive
RTSTRUCT → RTPLAN → RTDOSE; after the wait ``rt_incomplete_action`` parks or sends with
a WARNING; ``rt_completeness_wait_s = 0`` turns the check off; and in a running node a
structure set whose images, and a plan whose structure set, the ledger shows delivered
before are sent without waiting, while a held group shows on the console.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.config import ForwarderConfig
from dicomnode.forwarder import Forwarder
from dicomnode.ledger.schema import LedgerUnavailable, open_reader
from tests.conftest import (
    free_port,
    run_storescu,
    stays_false,
    wait_for_port,
    wait_until,
    write_config,
)
from tests.factories import ROOT, make_image, rt_set, save
from tests.integration.test_console import get
from tests.integration.test_forward import (
    TARGET_AET,
    StoreSCP,
    error_log,
    fconfig,
    files_in,
    start_forwarder,
    storescp,  # noqa: F401  (fixture)
)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning"),
]


def drop(ds: Dataset, folder: Path, name: str) -> Path:
    """Put ``ds`` into ``folder`` as a producer does: written aside, renamed into place."""
    staged = save(ds, folder.parent / ".staging" / name)
    folder.mkdir(parents=True, exist_ok=True)
    return staged.rename(folder / name)


def lines(caplog: pytest.LogCaptureFixture, verb: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(verb)]


def uid(ds: Dataset) -> str:
    return str(ds.SOPInstanceUID)


def test_rt_dose_and_plan_wait_for_their_structure_set_then_arrive_in_order(
    tmp_path: Path,
    storescp: StoreSCP,  # noqa: F811
    forwarders: list[Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="dicomnode")
    cfg = fconfig(tmp_path, storescp.port, rt_completeness_wait_s=120.0)
    rt = rt_set()
    group = cfg.watch_folder / "PAT1"
    drop(rt["rtdose"], group, "dose.dcm")
    drop(rt["rtplan"], group, "plan.dcm")
    fw = start_forwarder(forwarders, cfg)

    assert wait_until(lambda: lines(caplog, "WAITING"), 30), caplog.text
    [waiting] = lines(caplog, "WAITING")
    assert "group=PAT1 destination=default" in waiting
    assert f"missing=RTSTRUCT:{uid(rt['rtstruct'])}" in waiting
    assert "PAT1" in fw.status()["waiting"]  # type: ignore[operator]
    # several quiet periods and rescans: nothing sent, and no second WAITING line
    assert stays_false(lambda: storescp.order(), 3.0)
    assert len(lines(caplog, "WAITING")) == 1
    assert len(files_in(group)) == 2

    drop(rt["rtstruct"], group, "struct.dcm")
    assert wait_until(lambda: len(storescp.order()) == 3, 30), caplog.text
    assert storescp.received_sops() == [uid(rt["rtstruct"]), uid(rt["rtplan"]), uid(rt["rtdose"])]
    assert wait_until(lambda: not group.exists(), 10)
    assert lines(caplog, "RT-COMPLETE")
    assert not lines(caplog, "RT-INCOMPLETE")
    assert fw.status()["waiting"] == {}


@pytest.mark.parametrize("action", ["park", "send"])
def test_rt_wait_expiry_parks_or_sends_with_a_warning(
    tmp_path: Path,
    storescp: StoreSCP,  # noqa: F811
    forwarders: list[Forwarder],
    caplog: pytest.LogCaptureFixture,
    action: str,
) -> None:
    caplog.set_level("INFO", logger="dicomnode")
    cfg = fconfig(tmp_path, storescp.port, rt_completeness_wait_s=2.0, rt_incomplete_action=action)
    rt = rt_set()
    group = cfg.watch_folder / "PAT1"
    drop(rt["rtdose"], group, "dose.dcm")
    drop(rt["rtplan"], group, "plan.dcm")
    start_forwarder(forwarders, cfg)
    missing = f"RTSTRUCT:{uid(rt['rtstruct'])}"

    assert wait_until(lambda: lines(caplog, "RT-INCOMPLETE"), 30), caplog.text
    [warning] = [r for r in caplog.records if r.getMessage().startswith("RT-INCOMPLETE")]
    assert warning.levelname == "WARNING"
    assert f"missing={missing}" in warning.getMessage()
    assert f"action={action}" in warning.getMessage()
    assert lines(caplog, "WAITING")  # it waited first
    if action == "park":
        assert wait_until(lambda: not group.exists(), 10)
        parked = [p.name for p in files_in(cfg.failed_dir) if p.suffix == ".dcm"]
        assert sorted(parked) == ["dose.dcm", "plan.dcm"]
        log = error_log(cfg)
        assert missing in log and "rt_incomplete_action=park" in log
        assert stays_false(lambda: storescp.order(), 1.0)
    else:
        assert wait_until(lambda: len(storescp.order()) == 2, 30), caplog.text
        assert storescp.received_sops() == [uid(rt["rtplan"]), uid(rt["rtdose"])]
        assert wait_until(lambda: not group.exists(), 10)
        assert not error_log(cfg)


def test_rt_check_off_with_zero_wait(
    tmp_path: Path,
    storescp: StoreSCP,  # noqa: F811
    forwarders: list[Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="dicomnode")
    cfg = fconfig(tmp_path, storescp.port, rt_completeness_wait_s=0.0)
    rt = rt_set()
    drop(rt["rtdose"], cfg.watch_folder / "PAT1", "dose.dcm")
    start_forwarder(forwarders, cfg)
    assert wait_until(lambda: len(storescp.order()) == 1, 30), caplog.text
    assert not lines(caplog, "WAITING") and not lines(caplog, "RT-INCOMPLETE")


def test_rt_default_wait_holds_a_lone_dose(
    tmp_path: Path,
    storescp: StoreSCP,  # noqa: F811
    forwarders: list[Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The check is on by default (ForwarderConfig's documented 300 s)."""
    caplog.set_level("INFO", logger="dicomnode")
    assert ForwarderConfig().rt_completeness_wait_s == 300.0
    cfg = fconfig(tmp_path, storescp.port)
    rt = rt_set()
    drop(rt["rtdose"], cfg.watch_folder / "PAT1", "dose.dcm")
    start_forwarder(forwarders, cfg)
    assert wait_until(lambda: lines(caplog, "WAITING"), 30), caplog.text
    assert f"missing=RTPLAN:{uid(rt['rtplan'])}" in lines(caplog, "WAITING")[0]
    assert stays_false(lambda: storescp.order(), 1.5)


# --------------------------------------------------------------------------- a running node


def _forwarded_in_ledger(ledger: Path, sop_uid: str) -> bool:
    try:
        conn = open_reader(ledger)
    except LedgerUnavailable:
        return False
    try:
        row = conn.execute(
            "SELECT 1 FROM events WHERE sop_uid = ? AND kind = 'forwarded'", (sop_uid,)
        ).fetchone()
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    return row is not None


@pytest.mark.timeout(180)
def test_rt_node_sends_what_references_objects_the_ledger_shows_delivered(
    tmp_path: Path, start_node: Callable[..., Any]
) -> None:
    target = StoreSCP(tmp_path).start()
    try:
        web_port = free_port()
        watch = tmp_path / "watch"
        cfg = write_config(
            tmp_path / "node.ini",
            {
                "Network": {"receive_port": free_port()},
                "Directories": {"destination_dir": tmp_path / "received", "min_free_space_mb": 0},
                "Security": {"trusted_ae_titles": "SENDER"},
                "FolderWatcher": {
                    "watch_folder": watch,
                    "target_aet": TARGET_AET,
                    "target_ip": "127.0.0.1",
                    "target_port": target.port,
                    "inactivity_timeout": 0.5,
                    "process_timer_interval": 0.5,
                    "rt_completeness_wait_s": 600,
                },
                "Web": {"enabled": "true", "address": "127.0.0.1", "port": web_port},
            },
        )
        ledger = tmp_path / "received" / ".ledger" / "ledger.sqlite"
        study, series = generate_uid(ROOT), generate_uid(ROOT)
        rt = rt_set(study_uid=study, image_series=series)  # the struct lists no contour images
        cts = [make_image(study_uid=study, series_uid=series, instance=i) for i in (1, 2)]
        node = start_node(["--config", str(cfg), "--no-receiver"])
        wait_for_port(web_port, proc=node.proc)

        # the images go first, alone (dropped in, never received: the ledger knows only the send)
        for i, ct in enumerate(cts):
            drop(ct, watch / "EXPORT0", f"ct{i}.dcm")
        assert wait_until(lambda: len(target.order()) == 2, 60), node.output()
        assert wait_until(lambda: _forwarded_in_ledger(ledger, uid(cts[1])), 30)
        # the structure set's image series was delivered before (ledger: study + series)
        drop(rt["rtstruct"], watch / "EXPORT1", "struct.dcm")
        assert wait_until(lambda: len(target.order()) == 3, 60), node.output()
        assert wait_until(lambda: _forwarded_in_ledger(ledger, uid(rt["rtstruct"])), 30)
        assert "WAITING" not in node.output()

        started = time.monotonic()
        drop(rt["rtplan"], watch / "EXPORT2", "plan.dcm")
        drop(rt["rtdose"], watch / "EXPORT2", "dose.dcm")
        assert wait_until(lambda: len(target.order()) == 5, 60), node.output()
        assert time.monotonic() - started < 60  # far below the 600 s wait
        assert target.received_sops()[3:] == [uid(rt["rtplan"]), uid(rt["rtdose"])]
        assert "WAITING" not in node.output()

        # a dose whose plan was never delivered waits, and the console says why
        other = rt_set(study_uid=generate_uid(ROOT))
        drop(other["rtdose"], watch / "EXPORT3", "dose.dcm")
        assert wait_until(lambda: "WAITING group=EXPORT3" in node.output(), 60), node.output()
        status, page = get(f"http://127.0.0.1:{web_port}/queue")
        assert status == 200, page
        assert "waiting for RT references" in page and uid(other["rtplan"]) in page
        assert len(target.order()) == 5
        received = {
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files_in(target.out)
        }
        assert uid(other["rtdose"]) not in received
    finally:
        target.stop()


@pytest.mark.timeout(180)
def test_rt_received_then_forwarded_waits_for_the_structure_set_sent_later(
    tmp_path: Path, start_node: Callable[..., Any]
) -> None:
    """Receive → forward chain: a TPS sends dose and plan, later the structure set (DCMTK storescu
    to our receiver, which files into the watch folder); the target gets all three in order."""
    target = StoreSCP(tmp_path).start()
    try:
        port = free_port()
        watch = tmp_path / "watch"
        cfg = write_config(
            tmp_path / "node.ini",
            {
                "General": {"ae_title": "NODE"},
                "Network": {
                    "server_ip": "127.0.0.1",
                    "receive_port": port,
                    "receiver_processes": 1,
                },
                "Directories": {"destination_dir": tmp_path / "received", "min_free_space_mb": 0},
                "Security": {"trusted_ae_titles": "TPS"},
                "AE_Mappings": {"TPS": watch / "TPS"},
                "FolderWatcher": {
                    "watch_folder": watch,
                    "target_aet": TARGET_AET,
                    "target_ip": "127.0.0.1",
                    "target_port": target.port,
                    "inactivity_timeout": 0.5,
                    "process_timer_interval": 0.5,
                    "rt_completeness_wait_s": 600,
                },
            },
        )
        rt = rt_set(study_uid=generate_uid(ROOT))
        paths = {n: save(ds, tmp_path / "tps" / f"{n}.dcm") for n, ds in rt.items()}
        node = start_node(["--config", str(cfg)], port=port)

        sent = run_storescu(port, [paths["rtdose"], paths["rtplan"]], "TPS", "NODE")
        assert sent.returncode == 0, sent.stderr
        assert wait_until(lambda: "WAITING group=TPS" in node.output(), 60), node.output()
        assert f"missing=RTSTRUCT:{uid(rt['rtstruct'])}" in node.output()
        assert stays_false(lambda: target.order(), 2.0)

        sent = run_storescu(port, [paths["rtstruct"]], "TPS", "NODE")
        assert sent.returncode == 0, sent.stderr
        assert wait_until(lambda: len(target.order()) == 3, 60), node.output()
        assert target.received_sops() == [uid(rt["rtstruct"]), uid(rt["rtplan"]), uid(rt["rtdose"])]
        assert node.output().count("WAITING group=TPS") == 1
    finally:
        target.stop()

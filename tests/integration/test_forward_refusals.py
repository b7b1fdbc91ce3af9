"""One object the target keeps refusing never holds up its group (issue 12).

A target that answers one object with 0xA7xx every time while it accepts the
others (pynetdicom's storescp cannot write that one file; Orthanc refuses an
object without Series Instance UID) gets it ``max_object_refusals`` times, then
the object is parked with the status and its meaning; the rest of the group is
delivered, RT objects only after the images before them were acknowledged or
parked. A target that refuses everything is retried with backoff as before and
nothing is parked.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.forwarder import Forwarder
from tests.conftest import free_port, require_tool, wait_for_port, wait_until
from tests.factories import make_image, rt_set, save
from tests.integration.test_forward import (
    TARGET_AET,
    PySCP,
    error_log,
    fconfig,
    files_in,
    orthanc_target,
    start_forwarder,
)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning"),
]


class RefusingSCP:
    """A pynetdicom SCP that answers ``refuse_uid`` with ``status`` and records what arrived.

    For every other object it records (SOP Instance UID, whether the refused
    object was already parked in ``failed/`` at that moment).
    """

    def __init__(self, refuse_uid: str, status: int, failed_dir: Path) -> None:
        self.port = free_port()
        self.refuse_uid = refuse_uid
        self.status = status
        self.failed_dir = failed_dir
        self.refusals = 0
        self.received: list[tuple[str, bool]] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title=TARGET_AET)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(
                cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        self.server: ThreadedAssociationServer | None = None

    def _parked(self) -> bool:
        return any(p.name == "refused.dcm" for p in files_in(self.failed_dir))

    def _on_store(self, event):  # type: ignore[no-untyped-def]
        uid = str(event.dataset.SOPInstanceUID)
        with self._lock:
            if uid == self.refuse_uid:
                self.refusals += 1
                return self.status
            self.received.append((uid, self._parked() if self.failed_dir.exists() else False))
        return 0x0000

    def start(self) -> RefusingSCP:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def test_forward_object_refused_every_time_is_parked_and_rt_follows(
    tmp_path: Path, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dicomnode")
    cfg = fconfig(tmp_path, 0, max_object_refusals=3)
    group = cfg.watch_folder / "PAT"
    study = "1.2.826.0.1.3680043.8.498.1212"
    cts = [make_image("CT", study_uid=study, instance=i + 1) for i in range(3)]
    save(cts[0], group / "ct1.dcm")
    save(cts[1], group / "refused.dcm")
    save(cts[2], group / "ct3.dcm")
    rt = rt_set(study_uid=study)
    for name in ("rtstruct", "rtplan", "rtdose"):
        save(rt[name], group / f"{name}.dcm")
    scp = RefusingSCP(str(cts[1].SOPInstanceUID), 0xA701, cfg.failed_dir).start()
    try:
        from dataclasses import replace

        cfg = replace(cfg, target_port=scp.port)
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not group.exists(), 60), caplog.text
    finally:
        scp.stop()
    assert scp.refusals == 3  # max_object_refusals
    got = [uid for uid, _ in scp.received]
    rt_uids = [str(rt[n].SOPInstanceUID) for n in ("rtstruct", "rtplan", "rtdose")]
    assert got == [str(cts[0].SOPInstanceUID), str(cts[2].SOPInstanceUID), *rt_uids]
    # clinical order: no RT object before the refused image was parked
    assert [parked for uid, parked in scp.received if uid in rt_uids] == [True, True, True]
    log = error_log(cfg)
    assert len(log.splitlines()) == 1 and "refused.dcm" in log
    assert "status=0xA701" in log and "refused 3 time(s)" in log
    assert caplog.text.count("DEFERRED group=PAT") == 2
    assert not list((cfg.watch_folder / ".dicomnode-state").glob("*.json"))


def test_forward_target_refusing_everything_is_retried_not_parked(
    tmp_path: Path, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    """0xA700 for every object (out of space): backoff, nothing parked, even with max 1."""
    caplog.set_level("INFO", logger="dicomnode")
    scp = PySCP([make_image().SOPClassUID], statuses=[0xA700] * 6).start()
    try:
        cfg = fconfig(tmp_path, scp.port, max_object_refusals=1)
        cts = [make_image("CT", instance=i + 1) for i in range(3)]
        for i, ct in enumerate(cts):
            save(ct, cfg.watch_folder / "FULL" / f"{i}.dcm")
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not (cfg.watch_folder / "FULL").exists(), 60), caplog.text
    finally:
        scp.stop()
    assert caplog.text.count("RETRY-SCHEDULED") >= 3
    assert sorted(str(d.SOPInstanceUID) for d in scp.received) == sorted(
        str(ct.SOPInstanceUID) for ct in cts
    )
    assert not cfg.failed_dir.exists()


def test_forward_pynetdicom_storescp_that_cannot_write_one_file(
    tmp_path: Path, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom's storescp answers 0xA700 when it cannot write a file (here: a folder is in the way)."""
    caplog.set_level("INFO", logger="dicomnode")
    out = tmp_path / "pyscp-out"
    cts = [make_image("CT", instance=i + 1) for i in range(4)]
    (out / f"CT.{cts[1].SOPInstanceUID}").mkdir(parents=True)  # blocks that one object
    port = free_port()
    with (tmp_path / "pyscp.log").open("wb") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pynetdicom", "storescp", str(port), "-aet", TARGET_AET,
             "-od", str(out)],
            stdout=log_fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for_port(port, proc=proc)
            cfg = fconfig(tmp_path, port, max_object_refusals=2)
            for i, ct in enumerate(cts):
                save(ct, cfg.watch_folder / "P" / f"{i}.dcm")
            start_forwarder(forwarders, cfg)
            assert wait_until(lambda: not (cfg.watch_folder / "P").exists(), 60), caplog.text
        finally:
            proc.terminate()
            proc.wait(10)
    stored = {p.name for p in out.iterdir() if p.is_file()}
    assert stored == {f"CT.{ct.SOPInstanceUID}" for i, ct in enumerate(cts) if i != 1}
    log = error_log(cfg)
    assert len(log.splitlines()) == 1 and "P/1.dcm" in log and "status=0xA700" in log
    assert [p.name for p in files_in(cfg.failed_dir) if p.suffix == ".dcm"] == ["1.dcm"]


def test_forward_orthanc_refusing_object_without_series_uid(
    tmp_path: Path, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    require_tool("Orthanc")
    caplog.set_level("INFO", logger="dicomnode")
    orthanc = orthanc_target(tmp_path)
    try:
        cfg = fconfig(tmp_path, orthanc.dicom_port, max_object_refusals=2)
        cts = [make_image("CT", instance=i + 1) for i in range(3)]
        del cts[0].SeriesInstanceUID
        for i, ct in enumerate(cts):
            save(ct, cfg.watch_folder / "O" / f"{i}.dcm")
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not (cfg.watch_folder / "O").exists(), 60), caplog.text
        assert orthanc.sop_instance_uids() == {str(ct.SOPInstanceUID) for ct in cts[1:]}
    finally:
        orthanc.stop()
    log = error_log(cfg)
    assert len(log.splitlines()) == 1 and "O/0.dcm" in log and "status=0xA7" in log

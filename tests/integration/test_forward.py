"""Forwarder against real peers on 127.0.0.1: DCMTK storescp, Orthanc and pynetdicom SCPs.

Each test builds a watch folder with synthetic objects, runs the real
:class:`~dicomnode.forwarder.Forwarder` (or the one-shot functions) and checks
what the peer received, in which order, and what is left on disk.
"""

from __future__ import annotations

import json
import os
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RTPlanStorage,
)
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import ForwarderConfig
from dicomnode.forwarder import Forwarder, retry_failed, send_paths
from dicomnode.forwarder.state import STATE_DIR_NAME
from tests.conftest import (
    end_process,
    files_below,
    free_port,
    peer_env,
    require_tool,
    stays_false,
    wait_for_port,
    wait_until,
)
from tests.factories import make_image, rt_set, save
from tests.integration.orthanc_peer import OrthancPeer

pytestmark = [
    pytest.mark.interop,
    # watchdog 7's inotify observer warns (from its own thread) when `mkdir -p` makes it add
    # the same nested folder watch twice; harmless, but an error under filterwarnings=error.
    pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning"),
]

TARGET_AET = "TARGET"


# --------------------------------------------------------------------------- peers


class StoreSCP:
    """DCMTK storescp writing into ``out`` and appending each file name to ``order.txt``."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.exe = require_tool("storescp")
        self.port = port or free_port()
        self.out = tmp / "storescp-out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.order_file = tmp / "storescp-order.txt"
        self.log = tmp / "storescp.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    #: Options before the AE title (``--fork`` for one process per association).
    leading_args: tuple[str, ...] = ()

    def reception_note(self) -> str:
        """Return the shell command storescp runs for each file it stored."""
        return f"echo #f >> {self.order_file}"

    def start(self) -> StoreSCP:
        cmd = [
            self.exe,
            *self.leading_args,
            "--aetitle",
            TARGET_AET,
            "--output-directory",
            str(self.out),
            "--exec-on-reception",
            self.reception_note(),
            "--exec-sync",
            *self.extra_args,
            str(self.port),
        ]
        self._fh = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, env=peer_env(), stdout=self._fh, stderr=subprocess.STDOUT)
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, 10)
        self.proc = None
        if hasattr(self, "_fh"):
            self._fh.close()

    def order(self) -> list[str]:
        if not self.order_file.exists():
            return []
        return [line.strip() for line in self.order_file.read_text().splitlines() if line.strip()]

    def received_sops(self) -> list[str]:
        return [
            str(dcmread(self.out / name, stop_before_pixels=True).SOPInstanceUID)
            for name in self.order()
        ]


class PySCP:
    """A pynetdicom SCP that supports only the given SOP classes and answers ``status_for``."""

    def __init__(
        self,
        sop_classes: list[str],
        status_for: dict[str, int] | None = None,
        statuses: list[int] | None = None,
        delays_s: list[float] | None = None,
    ) -> None:
        self.port = free_port()
        self.statuses = list(statuses or [])  # consumed per C-STORE, then status_for/success
        self.delays_s = list(delays_s or [])
        self.received: list[Dataset] = []
        self.status_for = status_for or {}
        self.ae = AE(ae_title=TARGET_AET)
        for sop in sop_classes:
            self.ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server: ThreadedAssociationServer | None = None

    def _on_store(self, event):  # type: ignore[no-untyped-def]
        ds = event.dataset
        if self.delays_s:
            time.sleep(self.delays_s.pop(0))
        if self.statuses:
            return self.statuses.pop(0)
        self.received.append(ds)
        return self.status_for.get(str(ds.SOPClassUID), 0x0000)

    def start(self, ssl_context: ssl.SSLContext | None = None) -> PySCP:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
            ssl_context=ssl_context,
        )
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def orthanc_target(tmp: Path) -> OrthancPeer:
    """Orthanc as the forwarder's target (AE TARGET_AET)."""
    return OrthancPeer(tmp, aet=TARGET_AET)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path).start()
    yield scp
    scp.stop()


def fconfig(tmp_path: Path, port: int, **kw: object) -> ForwarderConfig:
    base = ForwarderConfig(
        watch_folder=tmp_path / "watch",
        target_aet=TARGET_AET,
        target_ip="127.0.0.1",
        target_port=port,
        calling_aet="FWDTEST",
        max_workers=2,
        heartbeat_interval=1.0,
        process_timer_interval=0.2,
        inactivity_timeout=0.5,
        retry_initial_delay_s=0.2,
        retry_max_delay_s=0.4,
        give_up_after_s=3600.0,
        acse_timeout_s=5.0,
        dimse_timeout_s=10.0,
        network_timeout_s=10.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def start_forwarder(forwarders: list[Forwarder], cfg: ForwarderConfig) -> Forwarder:
    cfg.watch_folder.mkdir(parents=True, exist_ok=True)
    fw = Forwarder(cfg)
    forwarders.append(fw)
    fw.start()
    return fw


def files_in(folder: Path) -> list[Path]:
    """Return the files below ``folder``, without the forwarder's own state (delivery record)."""
    return [p for p in files_below(folder) if STATE_DIR_NAME not in p.parts]


def write_study(folder: Path, n_ct: int = 3) -> dict[str, str]:
    """Write CT + RTSTRUCT + RTPLAN + RTDOSE with names that sort opposite to the send order.

    Returns the expected send order as {SOPInstanceUID: kind}.
    """
    study_uid = "1.2.826.0.1.3680043.8.498.77"
    rt = rt_set(study_uid=study_uid)
    cts = [make_image("CT", study_uid=study_uid, instance=i + 1) for i in range(n_ct)]
    # names: RT files first alphabetically, CT instances in reverse
    save(rt["rtdose"], folder / "a_0001.dcm")
    save(rt["rtplan"], folder / "sub" / "b_0002.dcm")
    save(rt["rtstruct"], folder / "c_0003.dcm")
    for i, ct in enumerate(cts):
        save(ct, folder / f"d_{n_ct - i:04d}.dcm")
    expected = {str(ct.SOPInstanceUID): "CT" for ct in cts}
    for kind, name in (("RTSTRUCT", "rtstruct"), ("RTPLAN", "rtplan"), ("RTDOSE", "rtdose")):
        expected[str(rt[name].SOPInstanceUID)] = kind
    return expected


def error_log(cfg: ForwarderConfig) -> str:
    path = cfg.failed_dir / "send_errors.log"
    return path.read_text() if path.exists() else ""


# --------------------------------------------------------------------------- tests


def test_forward_rt_group_arrives_in_clinical_order_and_is_deleted(
    tmp_path: Path, storescp: StoreSCP, forwarders: list[Forwarder]
) -> None:
    cfg = fconfig(tmp_path, storescp.port)
    expected = write_study(cfg.watch_folder / "PAT1")
    start_forwarder(forwarders, cfg)

    assert wait_until(lambda: len(storescp.order()) == len(expected), 30), storescp.order()
    assert wait_until(lambda: not (cfg.watch_folder / "PAT1").exists(), 10)
    assert storescp.received_sops() == list(expected)  # CT 1..3, RTSTRUCT, RTPLAN, RTDOSE
    prefixes = [name.split(".")[0] for name in storescp.order()]
    assert prefixes == ["CT", "CT", "CT", "RS", "RP", "RD"]
    assert cfg.watch_folder.is_dir()
    assert not cfg.failed_dir.exists() or not files_in(cfg.failed_dir)


def test_forward_non_dicom_file_parked_with_log_line_rest_delivered(
    tmp_path: Path, storescp: StoreSCP, forwarders: list[Forwarder]
) -> None:
    cfg = fconfig(tmp_path, storescp.port)
    group = cfg.watch_folder / "PAT2"
    save(make_image("CT", instance=1), group / "ct1.dcm")
    save(make_image("CT", instance=2), group / "ct2.dcm")
    (group / "notes" / "readme.txt").parent.mkdir(parents=True)
    (group / "notes" / "readme.txt").write_text("not dicom")
    (group / "empty.dcm").write_bytes(b"")
    # ignored: hidden, temporary and in-progress files never leave
    (group / ".hidden.dcm").write_bytes(b"x")
    (group / "partial.dcm.part").write_bytes(b"x")
    start_forwarder(forwarders, cfg)

    assert wait_until(lambda: len(storescp.order()) == 2, 30)
    assert wait_until(lambda: "readme.txt" in error_log(cfg) and "empty.dcm" in error_log(cfg), 10)
    parked = files_in(cfg.failed_dir)
    names = {p.name for p in parked}
    assert {"readme.txt", "empty.dcm", "send_errors.log"} <= names
    readme = next(p for p in parked if p.name == "readme.txt")
    assert readme.parent.name == "notes"
    assert readme.parent.parent.name.endswith("_PAT2")
    assert readme.read_text() == "not dicom"
    lines = error_log(cfg).splitlines()
    assert len(lines) == 2
    assert all("group=PAT2" in line for line in lines)
    assert any("not a DICOM file" in line for line in lines)
    assert any("empty file" in line for line in lines)
    assert not (group / "ct1.dcm").exists() and not (group / "ct2.dcm").exists()
    assert (group / ".hidden.dcm").exists() and (group / "partial.dcm.part").exists()


def test_forward_target_without_rt_classes_parks_only_those(
    tmp_path: Path, forwarders: list[Forwarder]
) -> None:
    scp = PySCP([CTImageStorage, RTPlanStorage], status_for={RTPlanStorage: 0xC000}).start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        expected = write_study(cfg.watch_folder / "PAT3")
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not (cfg.watch_folder / "PAT3").exists(), 30), files_in(
            cfg.watch_folder
        )
    finally:
        scp.stop()
    got = [str(ds.SOPInstanceUID) for ds in scp.received]
    cts = [uid for uid, kind in expected.items() if kind == "CT"]
    plan = next(uid for uid, kind in expected.items() if kind == "RTPLAN")
    assert got == [*cts, plan]
    log = error_log(cfg)
    lines = log.splitlines()
    assert len(lines) == 3, log
    dose = next(uid for uid, kind in expected.items() if kind == "RTDOSE")
    struct = next(uid for uid, kind in expected.items() if kind == "RTSTRUCT")
    assert f"sop_instance_uid={plan}" in log and "status=0xC000" in log
    assert f"sop_instance_uid={dose}" in log and f"sop_instance_uid={struct}" in log
    assert "SOP class not accepted" in log
    parked = {p.name for p in files_in(cfg.failed_dir)}
    assert {"a_0001.dcm", "b_0002.dcm", "c_0003.dcm"} <= parked
    assert any(p.name == "b_0002.dcm" and p.parent.name == "sub" for p in files_in(cfg.failed_dir))


def test_forward_target_down_keeps_files_then_delivers(
    tmp_path: Path, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dicomnode")
    scp = StoreSCP(tmp_path)  # not started yet: connection refused
    cfg = fconfig(tmp_path, scp.port)
    save(make_image("CT", instance=1), cfg.watch_folder / "PAT4" / "ct1.dcm")
    save(make_image("CT", instance=2), cfg.watch_folder / "PAT4" / "ct2.dcm")
    start_forwarder(forwarders, cfg)
    assert wait_until(lambda: caplog.text.count("RETRY-SCHEDULED") >= 2, 20)
    assert "cannot connect" in caplog.text
    assert len(files_in(cfg.watch_folder / "PAT4")) == 2
    assert not cfg.failed_dir.exists()
    state_files = list((cfg.watch_folder / ".dicomnode-state").glob("*.json"))
    assert len(state_files) == 1
    assert json.loads(state_files[0].read_text())["attempts"] >= 2
    assert wait_until(lambda: "HEARTBEAT pending_groups=1 files=2" in caplog.text, 10)
    scp.start()
    try:
        assert wait_until(lambda: len(scp.order()) == 2, 30)
        assert wait_until(lambda: not (cfg.watch_folder / "PAT4").exists(), 10)
        assert wait_until(
            lambda: not list((cfg.watch_folder / ".dicomnode-state").glob("*.json")), 10
        )
    finally:
        scp.stop()


def test_forward_give_up_parks_with_reason(tmp_path: Path, forwarders: list[Forwarder]) -> None:
    cfg = fconfig(tmp_path, free_port(), give_up_after_s=0.5)
    save(make_image("CT", instance=1), cfg.watch_folder / "PAT5" / "ct1.dcm")
    start_forwarder(forwarders, cfg)
    assert wait_until(lambda: "ct1.dcm" in error_log(cfg), 20)
    assert "gave up" in error_log(cfg)
    # the reason is logged (and fsynced) before the move, so the folder goes a moment later
    assert wait_until(lambda: not (cfg.watch_folder / "PAT5").exists(), 10)
    assert [p.name for p in files_in(cfg.failed_dir) if p.suffix == ".dcm"] == ["ct1.dcm"]


def test_forward_slowly_written_file_sent_only_when_complete(
    tmp_path: Path, storescp: StoreSCP, forwarders: list[Forwarder]
) -> None:
    cfg = fconfig(tmp_path, storescp.port, inactivity_timeout=0.8)
    src = tmp_path / "big.dcm"
    save(make_image("CT", rows=256, cols=256, instance=1), src)
    data = src.read_bytes()
    start_forwarder(forwarders, cfg)
    target = cfg.watch_folder / "PAT6" / "big.dcm"
    target.parent.mkdir(parents=True)
    chunk = len(data) // 8 + 1
    with target.open("wb") as fh:
        for i in range(0, len(data), chunk):
            fh.write(data[i : i + chunk])
            fh.flush()
            time.sleep(
                0.3
            )  # the writer's pace (slower than a rescan, quicker than the quiet period)
            assert storescp.order() == []
    assert wait_until(lambda: len(storescp.order()) == 1, 30)
    received = storescp.out / storescp.order()[0]
    assert dcmread(received).PixelData == dcmread(src).PixelData
    assert not error_log(cfg)


def test_forward_to_orthanc_polling_only(tmp_path: Path, forwarders: list[Forwarder]) -> None:
    orthanc = orthanc_target(tmp_path)
    try:
        cfg = fconfig(tmp_path, orthanc.dicom_port, use_polling=True)
        expected = write_study(cfg.watch_folder / "PAT7", n_ct=2)
        save(make_image("MR", instance=1), cfg.watch_folder / "loose.dcm")
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not files_in(cfg.watch_folder), 40), files_in(cfg.watch_folder)
        assert set(expected) <= orthanc.sop_instance_uids()
        assert len(orthanc.call("/instances")) == len(expected) + 1
    finally:
        orthanc.stop()


def test_forward_stop_leaves_unsent_files(tmp_path: Path, storescp: StoreSCP) -> None:
    cfg = fconfig(tmp_path, storescp.port, inactivity_timeout=30.0)
    save(make_image("CT", instance=1), cfg.watch_folder / "PAT8" / "ct1.dcm")
    fw = Forwarder(cfg)
    fw.start()
    fw.stop(5.0)
    assert (cfg.watch_folder / "PAT8" / "ct1.dcm").exists()
    assert storescp.order() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("dicomnode-forward")]


def test_send_paths_and_retry_failed(
    tmp_path: Path, storescp: StoreSCP, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = fconfig(tmp_path, storescp.port)
    src = tmp_path / "import" / "PAT9"
    expected = write_study(src, n_ct=2)
    (src / "junk.bin").write_bytes(b"\x00" * 200)
    loose = save(make_image("CT", instance=7), tmp_path / "import" / "single.dcm")
    rc = send_paths([src, loose], cfg, progress=True)
    assert rc == 1  # junk.bin could not be delivered
    total = len(expected) + 2
    assert f"{total}/{total} files" in capsys.readouterr().err
    assert len(storescp.order()) == len(expected) + 1
    assert storescp.received_sops()[: len(expected)] == list(expected)
    assert files_in(src) == []  # delivered deleted, junk parked
    parked = [p for p in files_in(cfg.failed_dir) if p.name == "junk.bin"]
    assert len(parked) == 1 and parked[0].parent.name.endswith("_PAT9")
    assert "junk.bin" in error_log(cfg)

    assert retry_failed(cfg) == 0
    assert (cfg.watch_folder / "PAT9" / "junk.bin").read_bytes() == b"\x00" * 200
    assert not [p for p in files_in(cfg.failed_dir) if p.name != "send_errors.log"]
    # never overwrite: park again, put a different file at the original place, retry
    (cfg.failed_dir / "20260101-000000_PAT9").mkdir()
    (cfg.failed_dir / "20260101-000000_PAT9" / "junk.bin").write_bytes(b"parked")
    assert retry_failed(cfg) == 1
    assert (cfg.watch_folder / "PAT9" / "junk.bin").read_bytes() == b"\x00" * 200
    assert (cfg.failed_dir / "20260101-000000_PAT9" / "junk.bin").read_bytes() == b"parked"


def test_send_paths_target_down_keeps_files(tmp_path: Path) -> None:
    cfg = fconfig(tmp_path, free_port())
    files = [save(make_image("CT", instance=i), tmp_path / "in" / f"{i}.dcm") for i in (1, 2)]
    assert send_paths([tmp_path / "in"], cfg, progress=False) == 1
    assert all(f.exists() for f in files)
    assert not cfg.failed_dir.exists()


def write_large_ct(path: Path, side: int) -> Path:
    """Write a CT of ``side`` x ``side`` 16-bit pixels without holding the pixels in memory."""
    ds = make_image("CT", rows=side, cols=side)
    del ds.PixelData
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    length = side * side * 2
    chunk = b"\x01\x02" * (2 * 1024 * 1024)
    with path.open("ab") as fh:
        fh.write(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<I", length))
        left = length
        while left:
            fh.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (VmHWM)")
def test_forward_large_object_memory_is_bounded(tmp_path: Path, storescp: StoreSCP) -> None:
    """Forward a 400 MB object in a fresh process; its peak RSS must stay far below the size.

    Without the send-queue bound pynetdicom queues most of the file in memory
    (about 520 MB peak for 1 GB against storescp's 16 KB PDUs).
    """
    cfg = fconfig(tmp_path, storescp.port)
    path = write_large_ct(tmp_path / "in" / "big.dcm", 14_142)
    size = path.stat().st_size
    code = (
        "import sys; from pathlib import Path;"
        "from dicomnode.config import ForwarderConfig as C;"
        "from dicomnode.forwarder import send_paths;"
        f"rc = send_paths([Path({str(path)!r})], C(watch_folder=Path({str(cfg.watch_folder)!r}),"
        f"target_aet={TARGET_AET!r}, target_ip='127.0.0.1', target_port={storescp.port},"
        "), False);"
        "hwm = open('/proc/self/status').read().split('VmHWM:')[1].split()[0];"
        "print(int(hwm) // 1024); sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    peak_mb = int(out.stdout.strip().splitlines()[-1])
    assert peak_mb < 120, f"peak RSS {peak_mb} MB"
    assert not path.exists()
    received = storescp.out / storescp.order()[0]
    assert abs(received.stat().st_size - size) < 1000  # the complete object arrived


def test_forward_missing_response_ends_association_and_rest_is_retried(
    tmp_path: Path, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dicomnode")
    scp = PySCP([CTImageStorage], delays_s=[2.0]).start()  # first C-STORE answered too late
    try:
        cfg = fconfig(tmp_path, scp.port, dimse_timeout_s=0.7)
        cts = [make_image("CT", instance=i + 1) for i in range(3)]
        for i, ct in enumerate(cts):
            save(ct, cfg.watch_folder / "PAT10" / f"{i}.dcm")
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not (cfg.watch_folder / "PAT10").exists(), 30), caplog.text
    finally:
        scp.stop()
    assert "no C-STORE response" in caplog.text and "RETRY-SCHEDULED" in caplog.text
    assert {str(ct.SOPInstanceUID) for ct in cts} <= {str(d.SOPInstanceUID) for d in scp.received}
    assert not cfg.failed_dir.exists()


def test_forward_out_of_resources_is_retried_not_parked(
    tmp_path: Path, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dicomnode")
    scp = PySCP([CTImageStorage], statuses=[0xA700, 0xA700]).start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        ct = make_image("CT", instance=1)
        save(ct, cfg.watch_folder / "PAT11" / "ct.dcm")
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not (cfg.watch_folder / "PAT11").exists(), 30), caplog.text
    finally:
        scp.stop()
    assert caplog.text.count("RETRY-SCHEDULED") >= 2 and "0xA700" in caplog.text
    assert [str(d.SOPInstanceUID) for d in scp.received] == [str(ct.SOPInstanceUID)]
    assert not cfg.failed_dir.exists()


def test_forward_rejected_association_keeps_files(
    tmp_path: Path, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dicomnode")
    scp = PySCP([CTImageStorage])
    scp.ae.require_calling_aet = ["SOMEONE"]
    scp.start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        save(make_image("CT", instance=1), cfg.watch_folder / "PAT12" / "ct.dcm")
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: "association rejected" in caplog.text, 20)
        assert wait_until(lambda: caplog.text.count("RETRY-SCHEDULED") >= 2, 20)
        assert (cfg.watch_folder / "PAT12" / "ct.dcm").exists()
        assert not cfg.failed_dir.exists()
    finally:
        scp.stop()


def test_forward_over_tls(tmp_path: Path, forwarders: list[Forwarder]) -> None:
    openssl = require_tool("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    scp = PySCP([CTImageStorage]).start(ssl_context=server)
    try:
        cfg = fconfig(tmp_path, scp.port)
        ct = make_image("CT", instance=1)
        save(ct, cfg.watch_folder / "PAT13" / "ct.dcm")
        cfg.watch_folder.mkdir(parents=True, exist_ok=True)
        fw = Forwarder(cfg, ssl_context=client)
        forwarders.append(fw)
        fw.start()
        assert wait_until(lambda: not (cfg.watch_folder / "PAT13").exists(), 30)
    finally:
        scp.stop()
    assert [str(d.SOPInstanceUID) for d in scp.received] == [str(ct.SOPInstanceUID)]


def test_forward_target_accepting_no_context_parks_whole_group(
    tmp_path: Path, forwarders: list[Forwarder]
) -> None:
    scp = PySCP([RTPlanStorage]).start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        save(make_image("CT", instance=1), cfg.watch_folder / "PAT14" / "a" / "ct1.dcm")
        save(make_image("MR", instance=1), cfg.watch_folder / "PAT14" / "mr1.dcm")
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not (cfg.watch_folder / "PAT14").exists(), 30)
    finally:
        scp.stop()
    assert scp.received == []
    parked = sorted(
        p.relative_to(cfg.failed_dir).as_posix()
        for p in files_in(cfg.failed_dir)
        if not p.name.startswith(".")
    )
    assert len(parked) == 3  # two objects + send_errors.log
    assert any(p.endswith("_PAT14/a/ct1.dcm") for p in parked)
    assert error_log(cfg).count("SOP class not accepted") == 2


def test_forward_many_small_files_one_association_no_nagle_stall(
    tmp_path: Path, storescp: StoreSCP
) -> None:
    """300 small objects in well under 6 s: Nagle (~45 ms per C-STORE) or a lost response would not."""
    cfg = fconfig(tmp_path, storescp.port, dimse_timeout_s=3.0)
    src = tmp_path / "in" / "MANY"
    for i in range(300):
        save(make_image("CT", rows=32, cols=32, instance=i + 1), src / f"{i:03d}.dcm")
    started = time.monotonic()
    assert send_paths([src], cfg, progress=False) == 0
    elapsed = time.monotonic() - started
    assert len(storescp.order()) == 300
    assert elapsed < 6.0, f"{elapsed:.1f} s for 300 files"
    assert list(src.iterdir()) == []  # delivered files deleted; the named folder itself stays


def test_forward_stop_during_send_keeps_unacknowledged_files(tmp_path: Path) -> None:
    scp = PySCP([CTImageStorage], delays_s=[0.4] * 10).start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        cts = [make_image("CT", instance=i + 1) for i in range(10)]
        for i, ct in enumerate(cts):
            save(ct, cfg.watch_folder / "PAT15" / f"{i}.dcm")
        fw = Forwarder(cfg)
        fw.start()
        assert wait_until(lambda: len(scp.received) >= 1, 20)
        started = time.monotonic()
        fw.stop(timeout_s=1.0)
        assert time.monotonic() - started < 8.0
        left = {p.name for p in (cfg.watch_folder / "PAT15").iterdir()}
        assert 0 < len(left) < 10
        acked = {str(d.SOPInstanceUID) for d in scp.received}
        for i, ct in enumerate(cts):
            if f"{i}.dcm" not in left:
                assert str(ct.SOPInstanceUID) in acked
        assert not cfg.failed_dir.exists()
    finally:
        scp.stop()


def test_forward_converts_compressed_object_only_when_target_needs_it(
    tmp_path: Path, storescp: StoreSCP, forwarders: list[Forwarder]
) -> None:
    """storescp accepts only uncompressed syntaxes: RLE is decoded and sent, JPEG (no decoder) is parked."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, RLELossless

    cfg = fconfig(tmp_path, storescp.port)
    rle = make_image("CT", instance=1)
    pixels = rle.PixelData
    rle.compress(RLELossless)
    save(rle, cfg.watch_folder / "PAT16" / "rle.dcm")
    jpeg = make_image("CT", instance=2)
    jpeg.BitsAllocated = jpeg.BitsStored = 8
    jpeg.HighBit = 7
    jpeg.PixelData = encapsulate([b"\xff\xd8not really a jpeg\xff\xd9"])
    jpeg["PixelData"].VR = "OB"
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    save(jpeg, cfg.watch_folder / "PAT16" / "jpeg.dcm")
    start_forwarder(forwarders, cfg)
    assert wait_until(lambda: not (cfg.watch_folder / "PAT16").exists(), 30)
    assert len(storescp.order()) == 1
    received = dcmread(storescp.out / storescp.order()[0])
    assert received.SOPInstanceUID == rle.SOPInstanceUID  # identity kept when decoding
    assert not received.file_meta.TransferSyntaxUID.is_compressed
    assert received.PixelData == pixels
    log = error_log(cfg)
    assert "jpeg.dcm" in log and "conversion" in log and "rle.dcm" not in log
    assert len(log.splitlines()) == 1


def test_forward_waits_while_receiver_conversion_is_pending(
    tmp_path: Path, storescp: StoreSCP, forwarders: list[Forwarder]
) -> None:
    cfg = fconfig(tmp_path, storescp.port)
    ae_root = cfg.watch_folder / "inbox" / "SCANNER"
    save(make_image("MR", instance=1), ae_root / "PAT" / "study" / "series" / "mr.dcm")
    marker = ae_root / ".convert-pending" / "abc.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    start_forwarder(forwarders, cfg)
    assert stays_false(lambda: storescp.order(), 2.0)  # 4x the quiet period
    marker.unlink()
    assert wait_until(lambda: len(storescp.order()) == 1, 20)


def test_forward_waits_for_marker_of_ae_folder_mapped_onto_watch_folder(
    tmp_path: Path, storescp: StoreSCP, forwarders: list[Forwarder]
) -> None:
    """An AE folder that *is* the watch folder keeps its markers at the root: only the named group waits."""
    cfg = fconfig(tmp_path, storescp.port)
    save(make_image("MR", instance=1), cfg.watch_folder / "PATA" / "study" / "series" / "mr.dcm")
    save(make_image("CT", instance=1), cfg.watch_folder / "PATB" / "study" / "series" / "ct.dcm")
    marker = cfg.watch_folder / ".convert-pending" / "abc.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"path": "PATA/study/series/mr.dcm", "sop_class_uid": "1.2"}))
    start_forwarder(forwarders, cfg)
    assert wait_until(lambda: len(storescp.order()) == 1, 20)  # PATB goes
    assert stays_false(lambda: len(storescp.order()) > 1, 2.0)  # PATA waits
    marker.unlink()
    assert wait_until(lambda: len(storescp.order()) == 2, 20)


def test_forward_retry_state_survives_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restarted forwarder continues the first-failure time: it gives up at once, no new backoff."""
    caplog.set_level("INFO", logger="dicomnode")
    cfg = fconfig(tmp_path, free_port(), give_up_after_s=1.5)
    save(make_image("CT", instance=1), cfg.watch_folder / "PAT17" / "ct.dcm")
    first = Forwarder(cfg)
    first.start()
    try:
        assert wait_until(lambda: caplog.text.count("RETRY-SCHEDULED") >= 2, 20)
    finally:
        first.stop(5.0)
    assert not cfg.failed_dir.exists()
    (state_file,) = (cfg.watch_folder / ".dicomnode-state").glob("*.json")
    first_failure = json.loads(state_file.read_text())["first_failure"]
    assert wait_until(lambda: time.time() >= first_failure + 1.5, 5)
    scheduled = caplog.text.count("RETRY-SCHEDULED")
    second = Forwarder(cfg)
    second.start()
    try:
        assert wait_until(lambda: "gave up" in error_log(cfg), 20)
    finally:
        second.stop(5.0)
    assert caplog.text.count("RETRY-SCHEDULED") == scheduled
    assert not list((cfg.watch_folder / ".dicomnode-state").glob("*.json"))


def test_forward_storescp_profile_without_rt_parks_rt_only(
    tmp_path: Path, forwarders: list[Forwarder]
) -> None:
    profile = tmp_path / "ctonly.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n[[PresentationContexts]]\n[CTOnly]\n"
        "PresentationContext1 = VerificationSOPClass\\Uncompressed\n"
        "PresentationContext2 = CTImageStorage\\Uncompressed\n"
        "[[Profiles]]\n[CTOnly]\nPresentationContexts = CTOnly\n"
    )
    scp = StoreSCP(tmp_path)
    scp.extra_args = ["--config-file", str(profile), "CTOnly"]
    scp.start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        expected = write_study(cfg.watch_folder / "PAT18", n_ct=2)
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not (cfg.watch_folder / "PAT18").exists(), 30)
        assert scp.received_sops() == [uid for uid, kind in expected.items() if kind == "CT"]
    finally:
        scp.stop()
    log = error_log(cfg)
    assert len(log.splitlines()) == 3 and log.count("SOP class not accepted") == 3


def test_forward_truncated_file_is_parked_not_sent(
    tmp_path: Path, storescp: StoreSCP, forwarders: list[Forwarder]
) -> None:
    cfg = fconfig(tmp_path, storescp.port)
    group = cfg.watch_folder / "PAT9"
    whole = save(make_image("CT", instance=1), group / "whole.dcm")
    cut = save(make_image("CT", instance=2), group / "cut.dcm")
    cut.write_bytes(cut.read_bytes()[:-100])  # pixel data claims more bytes than the file has
    start_forwarder(forwarders, cfg)

    assert wait_until(lambda: "cut.dcm" in error_log(cfg), 30)
    assert wait_until(lambda: not whole.exists(), 10)
    assert len(storescp.order()) == 1
    assert "truncated or malformed" in error_log(cfg)
    assert any(p.name == "cut.dcm" for p in files_in(cfg.failed_dir))

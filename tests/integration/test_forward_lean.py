"""The lean C-STORE SCU (the forwarder's one SCU) driven directly.

Against DCMTK storescp (bit-preserving, so stored data sets are the bytes we
sent), Orthanc, pynetdicom SCPs that answer chosen statuses, and raw-socket
peers that abort, freeze or answer the wrong message.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ImplicitVRLittleEndian

from dicomnode.config import ForwarderConfig
from dicomnode.dul.dimse import parse_command
from dicomnode.forwarder import source
from dicomnode.forwarder.batching import ObjectInfo, SendOutcome, plan_associations
from dicomnode.forwarder.lean import LeanAssociationSender
from dicomnode.forwarder.sender import RunEnd
from tests.conftest import free_port, require_tool, wait_until, write_config
from tests.factories import make_image, rt_set, save
from tests.integration.rawpeer import dataset_bytes
from tests.integration.test_forward import (
    TARGET_AET,
    PySCP,
    StoreSCP,
    orthanc_target,
    write_large_ct,
)

pytestmark = pytest.mark.interop

Result = tuple[ObjectInfo, SendOutcome, "int | None", str]


def lean_config(tmp_path: Path, port: int, **kw: object) -> ForwarderConfig:
    values: dict[str, object] = {
        "watch_folder": tmp_path / "watch",
        "target_aet": TARGET_AET,
        "target_ip": "127.0.0.1",
        "target_port": port,
        "calling_aet": "LEANTEST",
        "acse_timeout_s": 5.0,
        "dimse_timeout_s": 5.0,
        "network_timeout_s": 5.0,
        "transport": "lean",
    }
    values.update(kw)
    return ForwarderConfig(**values)  # type: ignore[arg-type]


def info_of(path: Path) -> ObjectInfo:
    ds = dcmread(path, stop_before_pixels=True)
    return ObjectInfo(
        rel_path=PurePosixPath(path.name),
        sop_class_uid=str(ds.file_meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(ds.file_meta.MediaStorageSOPInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )


def run_lean(
    cfg: ForwarderConfig,
    paths: Sequence[Path],
    sender: LeanAssociationSender | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[RunEnd, list[Result]]:
    """Send ``paths`` in the given order over one lean association."""
    by_name = {PurePosixPath(p.name): p for p in paths}
    plans = plan_associations([info_of(p) for p in paths])
    assert len(plans) == 1
    objects, contexts = plans[0]
    results: list[Result] = []
    end = (sender or LeanAssociationSender(cfg)).run(
        lambda o: by_name[o.rel_path],
        objects,
        contexts,
        lambda o, outcome, status, reason: results.append((o, outcome, status, reason)),
        lambda _o: True,
        should_stop,
    )
    return end, results


def outcomes(results: list[Result]) -> list[SendOutcome]:
    return [r[1] for r in results]


# --------------------------------------------------------------------------- raw peer


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _read_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def read_pdu(conn: socket.socket) -> tuple[int, bytes]:
    head = _read_exact(conn, 6)
    return head[0], _read_exact(conn, struct.unpack(">I", head[2:])[0])


def accept_association(conn: socket.socket, max_pdu: int = 16384) -> None:
    """Read an A-ASSOCIATE-RQ and accept every context with its first transfer syntax."""
    pdu_type, rq = read_pdu(conn)
    assert pdu_type == 0x01
    items = [_item(0x10, b"1.2.840.10008.3.1.1.1")]
    pos = 68
    while pos < len(rq):
        item_type, length = rq[pos], struct.unpack(">H", rq[pos + 2 : pos + 4])[0]
        body = rq[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if item_type != 0x20:
            continue
        sub = 4 + 4 + struct.unpack(">H", body[6:8])[0]  # skip the abstract syntax
        ts_len = struct.unpack(">H", body[sub + 2 : sub + 4])[0]
        ts = body[sub + 4 : sub + 4 + ts_len]
        items.append(_item(0x21, bytes([body[0], 0, 0, 0]) + _item(0x40, ts)))
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4")
    ac = rq[:68] + b"".join(items) + _item(0x50, user)
    conn.sendall(struct.pack(">BBI", 0x02, 0, len(ac)) + ac)


def read_request(conn: socket.socket) -> tuple[dict[int, bytes], int]:
    """Read one complete C-STORE-RQ; return its command set and the data set length."""
    command = b""
    data = 0
    while True:
        pdu_type, body = read_pdu(conn)
        assert pdu_type == 0x04, pdu_type
        pos = 0
        while pos < len(body):
            length = struct.unpack(">I", body[pos : pos + 4])[0]
            control = body[pos + 5]
            if control & 1:
                command += body[pos + 6 : pos + 4 + length]
            else:
                data += length - 2
                if control & 2:
                    return parse_command(command), data
            pos += 4 + length


def store_rsp(message_id: int, status: int) -> bytes:
    def elem(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value

    body = (
        elem(0x00000100, struct.pack("<H", 0x8001))
        + elem(0x00000120, struct.pack("<H", message_id))
        + elem(0x00000800, struct.pack("<H", 0x0101))
        + elem(0x00000900, struct.pack("<H", status))
    )
    cmd = elem(0x00000000, struct.pack("<I", len(body))) + body
    pdv = struct.pack(">IBB", len(cmd) + 2, 1, 0x03) + cmd
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


class RawTarget:
    """A one-connection peer on a raw socket that runs ``behaviour(conn)``."""

    def __init__(self, behaviour: Callable[[socket.socket], None]) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.behaviour = behaviour
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            try:
                self.behaviour(conn)
            except (OSError, ConnectionError) as exc:
                self.error = exc

    def close(self) -> None:
        self.server.close()
        self.thread.join(10)


@pytest.fixture
def raw_targets() -> Iterator[list[RawTarget]]:
    made: list[RawTarget] = []
    yield made
    for target in made:
        target.close()


# --------------------------------------------------------------------------- DCMTK storescp


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path).start()
    yield scp
    scp.stop()


@pytest.mark.parametrize("preadv", [True, False], ids=["preadv", "pread"])
def test_lean_delivers_byte_identical_data_sets_to_storescp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preadv: bool
) -> None:
    monkeypatch.setattr(source, "_HAS_PREADV", preadv and source._HAS_PREADV)
    scp = StoreSCP(tmp_path)
    scp.extra_args = ["--bit-preserving"]  # store the received data set bytes as they are
    scp.start()
    try:
        src = tmp_path / "src"
        paths = [save(make_image("CT", instance=i), src / f"ct{i}.dcm") for i in range(1, 4)]
        paths.append(write_large_ct(src / "big.dcm", 1300))  # 3.4 MB: ~200 PDUs of 16 KB
        for name, ds in rt_set().items():
            paths.append(save(ds, src / f"{name}.dcm"))
        cfg = lean_config(tmp_path, scp.port)
        end, results = run_lean(cfg, paths)
    finally:
        scp.stop()
    assert end == RunEnd()
    assert outcomes(results) == [SendOutcome.SENT] * len(paths)
    assert all(r[2] == 0 for r in results)
    stored = {
        str(dcmread(scp.out / name, stop_before_pixels=True).SOPInstanceUID): scp.out / name
        for name in scp.order()
    }
    assert len(stored) == len(paths)
    for path in paths:
        uid = info_of(path).sop_instance_uid
        assert dataset_bytes(stored[uid]) == dataset_bytes(path), path.name


def test_lean_reuses_sender_for_several_associations(tmp_path: Path, storescp: StoreSCP) -> None:
    cfg = lean_config(tmp_path, storescp.port)
    sender = LeanAssociationSender(cfg)
    for round_ in range(3):
        path = save(make_image("CT", instance=round_ + 1), tmp_path / f"r{round_}" / "ct.dcm")
        end, results = run_lean(cfg, [path], sender)
        assert end == RunEnd() and outcomes(results) == [SendOutcome.SENT]
    assert len(storescp.order()) == 3


def test_lean_target_down_reports_retry(tmp_path: Path) -> None:
    cfg = lean_config(tmp_path, free_port())
    paths = [save(make_image("CT", instance=i), tmp_path / f"{i}.dcm") for i in (1, 2)]
    end, results = run_lean(cfg, paths)
    assert end.network_error is not None and "cannot connect" in end.network_error
    assert outcomes(results) == [SendOutcome.RETRY, SendOutcome.RETRY]


def test_lean_to_orthanc(tmp_path: Path) -> None:
    orthanc = orthanc_target(tmp_path)
    try:
        paths = [save(ds, tmp_path / f"{name}.dcm") for name, ds in rt_set().items()]
        paths.append(write_large_ct(tmp_path / "big.dcm", 600))
        end, results = run_lean(lean_config(tmp_path, orthanc.dicom_port), paths)
        assert end == RunEnd()
        assert outcomes(results) == [SendOutcome.SENT] * len(paths)
        assert orthanc.sop_instance_uids() == {info_of(p).sop_instance_uid for p in paths}
    finally:
        orthanc.stop()


# --------------------------------------------------------------------------- pynetdicom SCPs


def test_lean_sop_class_not_accepted_is_refused_rest_sent(tmp_path: Path) -> None:
    scp = PySCP([CTImageStorage]).start()
    try:
        plan = save(rt_set()["rtplan"], tmp_path / "plan.dcm")
        ct = save(make_image("CT"), tmp_path / "ct.dcm")
        end, results = run_lean(lean_config(tmp_path, scp.port), [ct, plan])
    finally:
        scp.stop()
    assert end == RunEnd()
    assert outcomes(results) == [SendOutcome.SENT, SendOutcome.REFUSED]
    assert results[1][3] == "SOP class not accepted by the target"


def test_lean_failure_status_refuses_only_that_object(tmp_path: Path) -> None:
    scp = PySCP([CTImageStorage], statuses=[0x0000, 0xC000, 0xB000]).start()
    try:
        paths = [save(make_image("CT", instance=i), tmp_path / f"{i}.dcm") for i in (1, 2, 3)]
        end, results = run_lean(lean_config(tmp_path, scp.port), paths)
    finally:
        scp.stop()
    assert end == RunEnd()
    assert outcomes(results) == [SendOutcome.SENT, SendOutcome.REFUSED, SendOutcome.SENT]
    assert [r[2] for r in results] == [0x0000, 0xC000, 0xB000]


def test_lean_transient_status_of_one_object_defers_it_and_goes_on(tmp_path: Path) -> None:
    scp = PySCP([CTImageStorage], statuses=[0x0000, 0xA701]).start()
    try:
        paths = [save(make_image("CT", instance=i), tmp_path / f"{i}.dcm") for i in (1, 2, 3)]
        end, results = run_lean(lean_config(tmp_path, scp.port), paths)
    finally:
        scp.stop()
    assert end.network_error is None
    assert outcomes(results) == [SendOutcome.SENT, SendOutcome.DEFERRED, SendOutcome.SENT]
    assert results[1][2] == 0xA701 and "0xA701" in results[1][3]


def test_lean_transient_status_twice_in_a_row_retries_that_and_the_rest(tmp_path: Path) -> None:
    scp = PySCP([CTImageStorage], statuses=[0x0000, 0xA700, 0xA700]).start()
    try:
        paths = [save(make_image("CT", instance=i), tmp_path / f"{i}.dcm") for i in (1, 2, 3, 4)]
        end, results = run_lean(lean_config(tmp_path, scp.port), paths)
    finally:
        scp.stop()
    assert end.network_error is not None and "0xA700" in end.network_error
    assert outcomes(results) == [
        SendOutcome.SENT,
        SendOutcome.DEFERRED,
        SendOutcome.RETRY,
        SendOutcome.RETRY,
    ]


def test_lean_converts_when_target_accepts_only_implicit(tmp_path: Path) -> None:
    scp = PySCP([])
    scp.ae.add_supported_context(CTImageStorage, [ImplicitVRLittleEndian])
    scp.start()
    try:
        ds = make_image("CT", rows=64, cols=64)
        path = save(ds, tmp_path / "ct.dcm")
        end, results = run_lean(lean_config(tmp_path, scp.port), [path])
    finally:
        scp.stop()
    assert end == RunEnd() and outcomes(results) == [SendOutcome.SENT]
    received = scp.received[0]
    assert received.SOPInstanceUID == ds.SOPInstanceUID
    assert received.PixelData == ds.PixelData


def test_lean_missing_response_is_retry(tmp_path: Path) -> None:
    scp = PySCP([CTImageStorage], delays_s=[2.0]).start()
    try:
        paths = [save(make_image("CT", instance=i), tmp_path / f"{i}.dcm") for i in (1, 2)]
        end, results = run_lean(lean_config(tmp_path, scp.port, dimse_timeout_s=0.5), paths)
    finally:
        scp.stop()
    assert end.network_error is not None and "no C-STORE response" in end.network_error
    assert outcomes(results) == [SendOutcome.RETRY, SendOutcome.RETRY]


# --------------------------------------------------------------------------- raw peers


def test_lean_peer_abort_mid_data_set_is_retry(
    tmp_path: Path, raw_targets: list[RawTarget]
) -> None:
    def behaviour(conn: socket.socket) -> None:
        accept_association(conn)
        received = 0
        while received < 200_000:
            _t, body = read_pdu(conn)
            received += len(body)
        conn.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")
        conn.shutdown(socket.SHUT_RDWR)

    target = RawTarget(behaviour)
    raw_targets.append(target)
    big = write_large_ct(tmp_path / "big.dcm", 2000)  # 8 MB
    small = save(make_image("CT", instance=2), tmp_path / "small.dcm")
    end, results = run_lean(lean_config(tmp_path, target.port), [big, small])
    assert end.network_error is not None
    assert outcomes(results) == [SendOutcome.RETRY, SendOutcome.RETRY]


def test_lean_response_to_another_message_is_retry(
    tmp_path: Path, raw_targets: list[RawTarget]
) -> None:
    def behaviour(conn: socket.socket) -> None:
        accept_association(conn)
        command, _ = read_request(conn)
        (message_id,) = struct.unpack("<H", command[0x00000110])
        conn.sendall(store_rsp(message_id + 7, 0x0000))
        time.sleep(1.0)

    target = RawTarget(behaviour)
    raw_targets.append(target)
    paths = [save(make_image("CT", instance=i), tmp_path / f"{i}.dcm") for i in (1, 2)]
    end, results = run_lean(lean_config(tmp_path, target.port), paths)
    assert end.network_error is not None and "no C-STORE response" in end.network_error
    assert outcomes(results) == [SendOutcome.RETRY, SendOutcome.RETRY]


def test_lean_association_rejected_is_retry(tmp_path: Path, raw_targets: list[RawTarget]) -> None:
    def behaviour(conn: socket.socket) -> None:
        read_pdu(conn)
        conn.sendall(b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x07")  # called AE not recognized

    target = RawTarget(behaviour)
    raw_targets.append(target)
    path = save(make_image("CT"), tmp_path / "ct.dcm")
    end, results = run_lean(lean_config(tmp_path, target.port), [path])
    assert end.network_error is not None and "association rejected by" in end.network_error
    assert outcomes(results) == [SendOutcome.RETRY]


def test_lean_abort_from_another_thread_unblocks_a_frozen_send(
    tmp_path: Path, raw_targets: list[RawTarget]
) -> None:
    release = threading.Event()

    def behaviour(conn: socket.socket) -> None:
        accept_association(conn)
        release.wait(30)  # stop reading: the sender's writes block

    target = RawTarget(behaviour)
    raw_targets.append(target)
    big = write_large_ct(tmp_path / "big.dcm", 4000)  # 32 MB, far more than socket buffers
    cfg = lean_config(tmp_path, target.port, network_timeout_s=60.0)
    sender = LeanAssociationSender(cfg)
    threading.Timer(1.0, sender.abort).start()
    started = time.monotonic()
    try:
        end, results = run_lean(cfg, [big], sender)
    finally:
        release.set()
    assert time.monotonic() - started < 10
    assert end.network_error is not None
    assert outcomes(results) == [SendOutcome.RETRY]


def test_lean_abort_while_waiting_for_response_sends_a_abort(
    tmp_path: Path, raw_targets: list[RawTarget]
) -> None:
    seen: list[int] = []

    def behaviour(conn: socket.socket) -> None:
        accept_association(conn)
        read_request(conn)  # never answered
        seen.append(read_pdu(conn)[0])

    target = RawTarget(behaviour)
    raw_targets.append(target)
    path = save(make_image("CT"), tmp_path / "ct.dcm")
    cfg = lean_config(tmp_path, target.port, dimse_timeout_s=60.0)
    sender = LeanAssociationSender(cfg)
    threading.Timer(0.5, sender.abort).start()
    started = time.monotonic()
    end, results = run_lean(cfg, [path], sender)
    assert time.monotonic() - started < 10
    assert end.network_error is not None and "aborted locally" in end.network_error
    assert outcomes(results) == [SendOutcome.RETRY]
    assert wait_until(lambda: seen == [0x07], 5), seen


def test_lean_stop_between_objects_gives_no_callback(tmp_path: Path, storescp: StoreSCP) -> None:
    paths = [save(make_image("CT", instance=i), tmp_path / f"{i}.dcm") for i in (1, 2, 3)]
    calls = iter([False, True, True])
    end, results = run_lean(
        lean_config(tmp_path, storescp.port), paths, should_stop=lambda: next(calls)
    )
    assert end == RunEnd(stopped=True)
    assert outcomes(results) == [SendOutcome.SENT]


# --------------------------------------------------------------------------- memory


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (VmHWM)")
def test_lean_send_of_300_mb_object_keeps_rss_bounded(tmp_path: Path, storescp: StoreSCP) -> None:
    """``python -m dicomnode send`` with ``transport = lean``: peak RSS far below the size."""
    require_tool("storescp")
    path = write_large_ct(tmp_path / "out" / "big" / "big.dcm", 12_248)  # 300 MB
    size = path.stat().st_size
    cfg = write_config(
        tmp_path / "send.ini",
        {
            "General": {"ae_title": "LEANTEST"},
            "Directories": {"destination_dir": tmp_path / "unused", "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "*"},
            "FolderWatcher": {
                "watch_folder": tmp_path / "out",
                "target_aet": TARGET_AET,
                "target_ip": "127.0.0.1",
                "target_port": storescp.port,
                "transport": "lean",
            },
        },
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "--config", str(cfg), "send", str(path.parent)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    peak_kb = 0

    def sample() -> bool:
        nonlocal peak_kb
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError, ValueError):
            pass
        return proc.poll() is not None

    assert wait_until(sample, timeout_s=180, interval_s=0.01)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    assert proc.returncode == 0, out
    assert peak_kb // 1024 < 120, f"peak RSS {peak_kb // 1024} MB"
    assert not path.exists()
    received = storescp.out / storescp.order()[0]
    assert abs(received.stat().st_size - size) < 1000

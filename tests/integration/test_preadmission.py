"""Before anyone is trusted (issue 13): raw-socket attacks on the code that runs before admission.

Each test runs the real node (``python -m dicomnode``) on 127.0.0.1, attacks it
with :mod:`tests.integration.rawpeer` sockets (slow, idle, partial, oversize,
forged) and then checks what a trusted DCMTK sender still gets, what the
node's process costs (threads, memory from /proc), and what the log and the
folders hold.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.conftest import peer_env, require_tool, wait_until
from tests.deflate_factory import DEFLATED, deflated_data_set
from tests.factories import ROOT, make_image, save
from tests.integration.rawpeer import (
    CT_STORAGE,
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    PDU_DATA,
    RawPeer,
    associate_rq,
    response_status,
    store_pdus,
    visible_files,
)
from tests.integration.test_hardening import StartNode, assert_logged, ok_object, start, storescu

pytestmark = pytest.mark.interop

ONE = {"receiver_processes": 1}


def proc_status(pid: int, field: str) -> int:
    """Return a numeric field of /proc/<pid>/status (kB for memory, a count for Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20)


def is_closed_by_node(sock: socket.socket, wait_s: float = 0.0) -> bool:
    """Return True when the node closed ``sock`` (readable with end-of-file or reset)."""
    readable, _, _ = select.select([sock], [], [], wait_s)
    if not readable:
        return False
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except OSError:
        return True


def trusted_store_seconds(tmp_path: Path, port: int, name: str) -> float:
    """Send one object with storescu as the trusted SENDER; return how long it took."""
    path, _ = ok_object(tmp_path, name)
    started = time.monotonic()
    done = storescu(port, [path])
    assert done.returncode == 0, done.stdout + done.stderr
    return time.monotonic() - started


def raw_associate(port: int, calling: str, called: str = "NODE") -> int | None:
    """Send an A-ASSOCIATE-RQ whose AE title fields hold any bytes; return the answer's PDU type.

    pynetdicom refuses to encode such titles, so a valid request is patched.
    """
    rq = bytearray(associate_rq("CALLING", "CALLED", [CT_STORAGE]))
    rq[10:26] = called.encode("latin-1").ljust(16)
    rq[26:42] = calling.encode("latin-1").ljust(16)
    with RawPeer(port) as peer:
        peer.send(bytes(rq))
        return peer.read_pdu()[0]


def forged_lines(output: str) -> list[str]:
    """Return log lines an injected ``\\n``/``\\r`` would have started (they begin with FORGED)."""
    return [line for line in output.splitlines() if line.lstrip().startswith("FORGED")]


# --------------------------------------------------------------------------- item 1


def test_preadmission_request_has_a_deadline_not_a_per_read_timeout(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, _ = start(tmp_path, port, start_node, network={**ONE, "acse_timeout_s": 2})
    request = associate_rq("INTRUDER", "NODE", [CT_STORAGE])
    sock = connect(port)
    started = time.monotonic()
    closed_after = None
    with contextlib.closing(sock):
        for byte in request:  # one byte every 0.25 s: each read is well within 2 s
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            if is_closed_by_node(sock, 0.25):
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "a peer trickling its request held the connection"
    assert closed_after < 12, closed_after
    assert_logged(node, "ABORTED connection", "within acse_timeout_s=2")


def test_preadmission_trusted_sender_served_while_idle_and_slow_peers_hold_connections(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(
        tmp_path, port, start_node, network={**ONE, "max_associations": 2, "acse_timeout_s": 60}
    )
    request = associate_rq("INTRUDER", "NODE", [CT_STORAGE])
    peers = [connect(port) for _ in range(10)]  # idle
    for _ in range(10):  # slow: part of a request, then silence
        sock = connect(port)
        sock.sendall(request[:20])
        peers.append(sock)
    try:
        assert wait_until(lambda: open_fds(node.proc.pid) >= 20, 20)
        assert trusted_store_seconds(tmp_path, port, "trusted") < 15
        assert len([p for p in visible_files(dest) if "errors" not in p.parts]) == 1
    finally:
        for sock in peers:
            sock.close()


# --------------------------------------------------------------------------- item 2


@pytest.mark.slow
def test_preadmission_hundreds_of_partial_requests_cost_no_threads_and_little_memory(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, _ = start(
        tmp_path,
        port,
        start_node,
        network={
            **ONE,
            "acse_timeout_s": 120,
            "max_pending_associations": 1000,
            "max_pending_per_peer": 1000,
        },
    )
    pid = node.proc.pid
    assert trusted_store_seconds(tmp_path, port, "warm-up") < 30
    base_threads = proc_status(pid, "Threads")
    base_rss_kb = proc_status(pid, "VmRSS")
    base_fds = open_fds(pid)
    partial = associate_rq("INTRUDER", "NODE", [CT_STORAGE] * 20)[:150]
    peers = []
    try:
        for _ in range(400):
            sock = connect(port)
            sock.sendall(partial)
            peers.append(sock)
        assert wait_until(lambda: open_fds(pid) >= base_fds + 390, 30), open_fds(pid)
        threads = proc_status(pid, "Threads")
        rss_kb = proc_status(pid, "VmRSS")
        assert threads <= base_threads + 4, (base_threads, threads)
        assert rss_kb - base_rss_kb < 25_000, (base_rss_kb, rss_kb)
        assert trusted_store_seconds(tmp_path, port, "during") < 15
        assert proc_status(pid, "Threads") <= base_threads + 4
    finally:
        for sock in peers:
            sock.close()


def test_preadmission_per_peer_bound_closes_the_oldest_connections(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, _ = start(
        tmp_path,
        port,
        start_node,
        network={**ONE, "acse_timeout_s": 120, "max_pending_per_peer": 8},
    )
    peers = [connect(port) for _ in range(60)]
    try:
        assert wait_until(lambda: sum(is_closed_by_node(p) for p in peers) >= 52, 30)
        assert not any(is_closed_by_node(p) for p in peers[-4:])  # the newest are kept
        assert trusted_store_seconds(tmp_path, port, "after") < 15
        assert_logged(node, "max_pending_per_peer=8")
        # One line per peer and interval, however many were closed.
        assert node.output().count("max_pending_per_peer=8 reached") == 1
    finally:
        for sock in peers:
            sock.close()


def test_preadmission_repeated_refusals_are_logged_once_with_a_count(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, _ = start(tmp_path, port, start_node, network={**ONE, "refusal_log_interval_s": 3})
    for _ in range(300):
        with RawPeer(port) as peer:
            assert peer.associate("INTRUDER", "NODE") == PDU_ASSOCIATE_RJ
    assert_logged(node, "REJECTED association calling_ae=INTRUDER")
    assert node.output().count("REJECTED association calling_ae=INTRUDER") == 1
    assert_logged(node, "more connection(s)", timeout_s=20)
    assert trusted_store_seconds(tmp_path, port, "after") < 15


# --------------------------------------------------------------------------- item 3


def test_preadmission_oversize_associate_rq_is_refused_with_a_reason(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, _ = start(tmp_path, port, start_node, network={**ONE, "max_pdu_bytes": 4194304})
    body = os.urandom(300_000)
    with RawPeer(port) as peer:
        with contextlib.suppress(OSError):
            peer.send(struct.pack(">BBI", 0x01, 0, len(body)) + body)
        pdu_type, _ = peer.read_pdu()
    assert pdu_type in (0x03, 0x07), pdu_type  # A-ASSOCIATE-RJ or A-ABORT
    assert_logged(node, "ABORTED", "reason=A-ASSOCIATE-RQ of 300000 bytes")
    assert trusted_store_seconds(tmp_path, port, "after") < 15


# --------------------------------------------------------------------------- item 4


def test_preadmission_deflate_bomb_is_refused_kept_in_errors_with_flat_memory(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node, network=ONE)
    pid = node.proc.pid
    assert trusted_store_seconds(tmp_path, port, "warm-up") < 30
    base_hwm_kb = proc_status(pid, "VmHWM")
    ds = make_image("CT")
    bomb = deflated_data_set(ds, 400 * 1024 * 1024)
    assert len(bomb) < 1_000_000
    with RawPeer(port, timeout_s=120) as peer:
        peer.send(associate_rq("SENDER", "NODE", [CT_STORAGE], transfer_syntax=DEFLATED))
        assert peer.read_pdu()[0] == PDU_ASSOCIATE_AC
        for pdu in store_pdus(bomb, str(ds.SOPInstanceUID)):
            peer.send(pdu)
        pdu_type, body = peer.read_pdu()
        assert pdu_type == PDU_DATA
        assert response_status(body) in (0xA700, 0xC000)
    grown_mb = (proc_status(pid, "VmHWM") - base_hwm_kb) / 1024
    assert grown_mb < 40, f"receiver peak grew by {grown_mb:.0f} MB for a deflate bomb"
    kept = list((dest / "errors").glob("*.dcm"))
    assert len(kept) == 1 and kept[0].stat().st_size < 2_000_000
    assert_logged(node, "STORE-FAILED", "deflate bomb")
    assert not [
        p
        for p in visible_files(dest)
        if "errors" not in p.parts
        and "warm-up" not in str(p)
        and p.suffix == ".dcm"
        and ds.SOPInstanceUID in p.name
    ]


# --------------------------------------------------------------------------- item 5


def test_preadmission_ae_titles_match_exactly_and_control_chars_are_refused(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    mapped = tmp_path / "bound-folder"
    node, dest = start(
        tmp_path,
        port,
        start_node,
        network=ONE,
        trusted="*",
        extra={"AE_Mappings": {"BOUND": mapped}, "AE_Hosts": {"BOUND": "10.9.9.9"}},
    )
    for title in ("SEND\tER", "SENDER\r", "SEN\nDER", "SEND\x0bER", "SEND\\ER"):
        assert raw_associate(port, title) == PDU_ASSOCIATE_RJ, repr(title)
    assert_logged(node, "REJECTED association calling_ae=SEND\\x09ER")
    ds = make_image("CT")
    with RawPeer(port) as peer:  # "bound" is not BOUND: admitted under *, not in BOUND's folder
        assert peer.associate("bound", "NODE") == PDU_ASSOCIATE_AC
        assert peer.store(_dataset(ds), str(ds.SOPInstanceUID)) == 0x0000
    assert not mapped.exists() or not any(mapped.rglob("*.dcm"))
    assert len(list((dest / "incoming").rglob("*.dcm"))) == 1
    with RawPeer(port) as peer:  # BOUND itself is bound to another host
        assert peer.associate("BOUND", "NODE") == PDU_ASSOCIATE_RJ


def _dataset(ds: object) -> bytes:
    from tests.integration.rawpeer import encode_dataset

    return encode_dataset(ds)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- item 6


def test_preadmission_log_lines_cannot_be_forged_from_any_field(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, _ = start(tmp_path, port, start_node, network=ONE, trusted="SENDER")
    # AE titles (calling, called): refused, and the refusal is one line.
    for calling, called in (("X\nFORGED", "NODE"), ("SENDER", "N\rFORGED"), ("A\x85FORGED", "N")):
        assert raw_associate(port, calling, called) == PDU_ASSOCIATE_RJ
    # UIDs and names inside an admitted association.
    ds = make_image("CT", patient_name="A\nFORGED")
    ds.SOPInstanceUID = "1.2.3\nFORGED"
    ds.StudyInstanceUID = generate_uid(ROOT) + "\rFORGED"
    with RawPeer(port) as peer:
        assert peer.associate("SENDER", "NODE") == PDU_ASSOCIATE_AC
        assert peer.store(_dataset(ds), "1.2.3\nFORGED") == 0xC000
    assert_logged(node, "STORE-FAILED", "calling_ae=X\\x0aFORGED")
    output = node.output()
    assert forged_lines(output) == [], forged_lines(output)
    assert "\r" not in output


# --------------------------------------------------------------------------- item 7


def _node_children(pid: int) -> list[int]:
    done = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    )
    return [
        int(line.split()[0])
        for line in done.stdout.splitlines()
        if line.strip() and "resource_tracker" not in line
    ]


def _kill_tree(pid: int) -> None:
    for target in [pid, *_node_children(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


def _big_object(tmp_path: Path, name: str, side: int) -> Path:
    return save(make_image("CT", rows=side, cols=side), tmp_path / "big" / f"{name}.dcm")


def _storescu_popen(port: int, path: Path, slow: bool = False) -> subprocess.Popen[bytes]:
    exe = require_tool("storescu")
    pdu = ["--max-send-pdu", "4096"] if slow else []
    return subprocess.Popen(
        [exe, "-aet", "SENDER", "-aec", "NODE", *pdu, "127.0.0.1", str(port), str(path)],
        env=peer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_preadmission_part_file_of_a_killed_cross_volume_copy_is_removed_at_start(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test folder")
    mapped = shm / f"dicomnode-test-{os.getpid()}-{port}"
    try:
        sections = {"AE_Mappings": {"SENDER": mapped}}
        big = _big_object(tmp_path, "big", 7000)  # ~98 MB
        caught = False
        for _attempt in range(6):
            node, _ = start(tmp_path, port, start_node, network=ONE, extra=sections)
            sender = _storescu_popen(port, big)
            caught = wait_until(lambda: any(mapped.rglob("*.part")), 60, 0.002)
            _kill_tree(node.proc.pid)
            node.proc.wait()
            sender.kill()
            sender.wait()
            if caught and any(mapped.rglob("*.part")):
                break
            caught = False
            for done in mapped.rglob("*.dcm"):
                done.unlink()
        assert caught, "never caught the copy to the other volume in progress"
        node, _ = start(tmp_path, port, start_node, network=ONE, extra=sections)
        assert wait_until(lambda: not any(mapped.rglob("*.part")), 20), list(mapped.rglob("*"))
        assert_logged(node, "CLEANED")
    finally:
        subprocess.run(["rm", "-rf", str(mapped)], check=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_preadmission_temp_file_of_a_killed_worker_is_removed_when_it_restarts(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node, network={"receiver_processes": 2})
    tmp = dest / ".incoming-tmp"
    big = _big_object(tmp_path, "big", 6000)  # ~72 MB, sent in 4 KB PDUs
    sender = _storescu_popen(port, big, slow=True)
    try:
        assert wait_until(
            lambda: any(f.stat().st_size > 1_000_000 for f in tmp.glob("*") if f.is_file()),
            60,
            0.01,
        ), "transfer never started"
        partial = [f for f in tmp.glob("*") if f.is_file() and f.stat().st_size > 1_000_000]
        for worker in _node_children(node.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        sender.kill()
        assert_logged(node, "RESTARTING receiver process", timeout_s=30)
        assert wait_until(lambda: not any(p.exists() for p in partial), 30), partial
        assert node.proc.poll() is None  # the node itself was never restarted
        assert trusted_store_seconds(tmp_path, port, "after") < 30
    finally:
        sender.kill()
        sender.wait()


def test_preadmission_forwarder_log_and_send_errors_cannot_be_forged_by_file_names(
    tmp_path: Path, start_node: StartNode
) -> None:
    from tests.integration.test_forward_cli import SlowSCP, forwarder_ini

    scp = SlowSCP(delay_s=0.0)
    try:
        watch = tmp_path / "watch"
        group = watch / "PAT\nFORGED-GROUP"
        save(make_image("CT"), group / "good.dcm")
        (group / "bad\rFORGED\tfield.dcm").write_bytes(b"not DICOM at all\n")
        node = start_node(
            ["--config", str(forwarder_ini(tmp_path, watch, scp.port)), "--no-receiver"]
        )
        errors_log = watch / "failed" / "send_errors.log"
        assert wait_until(lambda: errors_log.exists() and scp.count() == 1, 30), node.output()
        assert wait_until(lambda: not group.exists(), 30), node.output()
        lines = errors_log.read_text(encoding="utf-8").splitlines()
        assert len(lines) == 1, lines
        assert len(lines[0].split("\t")) == 6, lines[0]  # no forged tab-separated field
        assert "bad\\x0dFORGED\\x09field.dcm" in lines[0] or "bad FORGED field" in lines[0]
        output = node.output()
        assert forged_lines(output) == [], forged_lines(output)
        assert "\r" not in output
    finally:
        scp.stop()

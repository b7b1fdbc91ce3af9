"""Hardening of the receiver against hostile, broken and greedy peers (issue 6).

Every test runs the real node (``python -m dicomnode``) on 127.0.0.1 and talks
to it with DCMTK, or with :mod:`tests.integration.rawpeer` where a polite
client cannot misbehave the way the test needs. Each test asserts the answer
the peer gets, the log line the operator sees, what is (and is not) on disk,
and that the node still serves an honest peer afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import (
    peer_env,
    require_tool,
    run_storescu,
    stays_false,
    wait_until,
    write_config,
)
from tests.factories import ROOT, make_image, save
from tests.integration.rawpeer import (
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    RawPeer,
    acknowledged_by_storescu,
    assert_nothing_half_written,
    dataset_bytes,
    encode_dataset,
    mounted_tmpfs,
    store_pdus,
    visible_files,
)

pytestmark = pytest.mark.interop

StartNode = Callable[..., Any]


def start(
    tmp_path: Path,
    port: int,
    start_node: StartNode,
    dest: Path | None = None,
    network: dict[str, object] | None = None,
    extra: dict[str, dict[str, object]] | None = None,
    min_free_space_mb: int = 0,
    trusted: str = "SENDER, GOOD, BOUND, NAMED",
) -> tuple[Any, Path]:
    """Start a node with the given overrides; return (NodeProcess, destination_dir)."""
    dest = dest or tmp_path / "dest"
    sections: dict[str, dict[str, object]] = {
        "General": {"ae_title": "NODE"},
        "Network": {"server_ip": "127.0.0.1", "receive_port": port, **(network or {})},
        "Directories": {"destination_dir": dest, "min_free_space_mb": min_free_space_mb},
        "Security": {"trusted_ae_titles": trusted},
        "Tools": {"enhanced_mr_conversion": "off"},
    }
    sections.update(extra or {})
    cfg = write_config(tmp_path / "node.ini", sections)
    node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    assert wait_until(lambda: "READY" in node.output(), 20), node.output()
    return node, dest


def storescu(
    port: int, files: list[Path], aet: str = "SENDER", timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu (verbose) against the node; return the finished process."""
    return run_storescu(port, files, aet, "NODE", ("-v",), timeout_s)


def echoscu(port: int, aet: str = "SENDER") -> bool:
    """Return True when DCMTK echoscu gets a successful C-ECHO from the node."""
    exe = require_tool("echoscu")
    done = subprocess.run(
        [exe, "-aet", aet, "-aec", "NODE", "127.0.0.1", str(port)],
        env=peer_env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0


def assert_logged(node: Any, *texts: str, timeout_s: float = 10.0) -> None:
    """Wait until every text is in the node's log (worker processes log through a queue)."""
    assert wait_until(lambda: all(t in node.output() for t in texts), timeout_s), (
        f"not logged: {texts}\n{node.output()[-3000:]}"
    )


def stored(dest: Path) -> list[Path]:
    """Return the objects filed below the AE folders (not errors/, not temp)."""
    return [p for p in visible_files(dest) if p.parts[len(dest.parts)] != "errors"]


def errors_entries(dest: Path) -> list[Path]:
    return sorted((dest / "errors").glob("*.log")) if (dest / "errors").exists() else []


def path_uid(path: Path) -> str:
    """Return the SOP Instance UID of a file we wrote."""
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def ok_object(tmp_path: Path, name: str, **kwargs: Any) -> tuple[Path, Dataset]:
    ds = make_image(**kwargs)
    return save(ds, tmp_path / "send" / f"{name}.dcm"), ds


# --------------------------------------------------------------------------- who may connect


def test_hardening_ae_host_binding_rejects_trusted_title_from_wrong_address(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(
        tmp_path,
        port,
        start_node,
        extra={"AE_Hosts": {"BOUND": "10.1.2.3", "GOOD": "127.0.0.1", "NAMED": "localhost"}},
    )
    path, _ = ok_object(tmp_path, "one")

    bad = storescu(port, [path], aet="BOUND")
    assert "Association Rejected" in bad.stderr + bad.stdout, bad.stderr
    with RawPeer(port) as peer:
        assert peer.associate(calling="BOUND") == PDU_ASSOCIATE_RJ
    assert stored(dest) == []
    assert wait_until(
        lambda: (
            "REJECTED association calling_ae=BOUND" in node.output() and "AE_Hosts" in node.output()
        )
    ), node.output()

    for aet in ("GOOD", "NAMED"):
        good = storescu(port, [path], aet=aet)
        assert good.returncode == 0 and "Success" in good.stderr, good.stderr
    assert len(stored(dest)) == 1


def test_hardening_untrusted_ae_gets_a_real_associate_rj_every_time(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node)
    for _ in range(5):
        with RawPeer(port) as peer:
            assert peer.associate(calling="INTRUDER") == PDU_ASSOCIATE_RJ
    assert stored(dest) == []
    assert_logged(node, "REJECTED association calling_ae=INTRUDER")


def test_hardening_max_associations_refuses_excess_and_recovers(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(
        tmp_path, port, start_node, network={"max_associations": 2, "receiver_processes": 1}
    )
    path, _ = ok_object(tmp_path, "one")
    holders: list[RawPeer] = []

    def hold_one() -> bool:
        # Retried only while start-up port probes are still being torn down.
        peer = RawPeer(port)
        if peer.associate() == PDU_ASSOCIATE_AC:
            holders.append(peer)
            return True
        peer.close()
        return False

    try:
        for _ in range(2):
            assert wait_until(hold_one, 10, interval_s=0.1), node.output()
        with RawPeer(port) as third:
            assert third.associate() == PDU_ASSOCIATE_RJ
        refused = storescu(port, [path])
        assert "Association Rejected" in refused.stderr, refused.stderr
        assert_logged(node, "REJECTED association calling_ae=SENDER")
    finally:
        for peer in holders:
            peer.close()
    assert wait_until(lambda: storescu(port, [path]).returncode == 0, 20)
    assert len(stored(dest)) == 1


def test_hardening_port_probes_do_not_hold_association_slots(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    """A TCP connect-and-close (scanner, health check) must not count for acse_timeout_s."""
    node, dest = start(
        tmp_path, port, start_node, network={"max_associations": 1, "receiver_processes": 1}
    )
    for _ in range(3):
        socket.create_connection(("127.0.0.1", port)).close()

    def associates() -> bool:
        with RawPeer(port) as peer:
            return peer.associate() == PDU_ASSOCIATE_AC

    # acse_timeout_s is 30 s by default: the slot must come back long before that.
    assert wait_until(associates, 5, interval_s=0.2), node.output()
    path, _ = ok_object(tmp_path, "one")
    assert storescu(port, [path]).returncode == 0
    assert len(stored(dest)) == 1


def test_hardening_max_associations_is_node_wide_with_process_pool(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    start(tmp_path, port, start_node, network={"max_associations": 2, "receiver_processes": 2})
    holders: list[RawPeer] = []
    accepted = 0
    try:
        for _ in range(6):
            peer = RawPeer(port)
            holders.append(peer)
            accepted += peer.associate() == PDU_ASSOCIATE_AC
        assert accepted <= 2, f"{accepted} concurrent associations admitted, max_associations=2"
    finally:
        for peer in holders:
            peer.close()


def test_hardening_object_larger_than_max_object_mb_is_refused(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node, network={"max_object_mb": 1})
    big = make_image(rows=1024, cols=1024)  # 2 MB of pixels
    small = make_image()
    with RawPeer(port) as peer:
        assert peer.associate() == PDU_ASSOCIATE_AC
        assert peer.store(encode_dataset(big), big.SOPInstanceUID) == 0xA700
        assert peer.store(encode_dataset(small), small.SOPInstanceUID) == 0x0000
    files = stored(dest)
    assert [f.name for f in files] == [f"CT_{small.SOPInstanceUID}.dcm"]
    assert_logged(node, "max_object_mb")
    assert_nothing_half_written(dest)


# --------------------------------------------------------------------------- stalled peers


@pytest.mark.slow
def test_hardening_stalled_peers_are_dropped_without_affecting_others(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(
        tmp_path,
        port,
        start_node,
        network={"network_timeout_s": 2, "dimse_timeout_s": 2, "acse_timeout_s": 2},
    )
    victim = make_image(rows=256, cols=256)
    pdus = store_pdus(encode_dataset(victim), victim.SOPInstanceUID)
    assert len(pdus) > 4
    mid_pdu = RawPeer(port, timeout_s=30)  # stops inside a PDU
    between = RawPeer(port, timeout_s=30)  # stops between two PDUs of one object
    silent = RawPeer(port, timeout_s=30)  # connects and never says anything
    try:
        for peer in (mid_pdu, between):
            assert peer.associate() == PDU_ASSOCIATE_AC
            for pdu in pdus[:3]:
                peer.send(pdu)
        mid_pdu.send(pdus[3][:100])
        stalled_at = time.monotonic()

        files = [ok_object(tmp_path, f"ok{i}", instance=i)[0] for i in range(20)]
        honest = storescu(port, files)
        assert honest.returncode == 0, honest.stderr
        assert honest.stderr.count("Received Store Response (Success)") == 20

        for peer in (mid_pdu, between, silent):
            pdu_type, _ = peer.read_pdu()  # A-ABORT or closed, never a response
            assert pdu_type in (None, 0x07)
        # dropped by the 2 s timeouts; the bound leaves room for a loaded machine
        assert time.monotonic() - stalled_at < 25
    finally:
        for peer in (mid_pdu, between, silent):
            peer.close()
    names = {p.name for p in stored(dest)}
    assert f"CT_{victim.SOPInstanceUID}.dcm" not in names
    assert len(names) == 20
    temp = dest / ".incoming-tmp"
    assert wait_until(lambda: not any(p.is_file() for p in temp.iterdir()), 10), list(
        temp.iterdir()
    )
    assert_logged(node, "DISCARDED incomplete transfer")
    assert_nothing_half_written(dest)


# --------------------------------------------------------------------------- disk


def test_hardening_disk_guard_refuses_before_filing_and_recovers(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    with mounted_tmpfs(tmp_path / "vol", "12m") as vol:
        node, dest = start(tmp_path, port, start_node, dest=vol / "dest", min_free_space_mb=6)
        ballast = vol / "ballast.bin"
        ballast.write_bytes(b"\0" * 7_000_000)
        first, _ = ok_object(tmp_path, "first")
        with RawPeer(port) as peer:
            assert peer.associate() == PDU_ASSOCIATE_AC
            ds = make_image()
            assert peer.store(encode_dataset(ds), ds.SOPInstanceUID) == 0xA700
            # Larger than the space left: refused before a byte is written, so the
            # disk never fills up (no "No space left on device").
            big = make_image(rows=2048, cols=2048)
            assert peer.store(encode_dataset(big), big.SOPInstanceUID) == 0xA700
        assert stored(dest) == []
        assert_logged(node, "below min_free_space_mb=6", str(big.SOPInstanceUID))
        big_lines = [ln for ln in node.output().splitlines() if str(big.SOPInstanceUID) in ln]
        assert any("below min_free_space_mb=6" in ln for ln in big_lines), big_lines
        assert not any("No space left" in ln for ln in big_lines), big_lines
        assert not any(p.is_file() for p in (dest / ".incoming-tmp").iterdir())
        refused = storescu(port, [first])
        assert "Success" not in refused.stderr
        assert stored(dest) == []

        ballast.unlink()
        again = storescu(port, [first])
        assert again.returncode == 0 and "Success" in again.stderr, again.stderr
        assert len(stored(dest)) == 1
        node.stop()


def test_hardening_disk_guard_covers_an_ae_folder_on_another_volume(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    """An AE mapped to a nearly full volume (e.g. a watch folder) is refused; others still store."""
    with mounted_tmpfs(tmp_path / "outvol", "8m") as vol:
        (vol / "ballast.bin").write_bytes(b"\0" * 4_000_000)
        node, _ = start(
            tmp_path,
            port,
            start_node,
            min_free_space_mb=6,
            extra={"AE_Mappings": {"SENDER": vol / "watch"}},
        )
        first, _ = ok_object(tmp_path, "first")
        refused = storescu(port, [first], aet="SENDER")
        assert "Success" not in refused.stderr
        assert not list((vol / "watch").rglob("*.dcm"))
        assert_logged(node, "below min_free_space_mb=6", str(vol / "watch"))
        accepted = storescu(port, [first], aet="GOOD")  # destination_dir itself has room
        assert accepted.returncode == 0 and "Success" in accepted.stderr, accepted.stderr
        (vol / "ballast.bin").unlink()
        again = storescu(port, [first], aet="SENDER")
        assert again.returncode == 0 and "Success" in again.stderr, again.stderr
        assert len([p for p in (vol / "watch").rglob("*.dcm") if p.is_file()]) == 1
        node.stop()


def test_hardening_full_disk_gives_failure_statuses_and_no_partial_files(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    with mounted_tmpfs(tmp_path / "vol", "2m") as vol:
        node, dest = start(tmp_path, port, start_node, dest=vol / "dest", min_free_space_mb=0)
        objects = [make_image(rows=256, cols=512, instance=i) for i in range(10)]  # 256 KB each
        statuses = []
        with RawPeer(port) as peer:
            assert peer.associate() == PDU_ASSOCIATE_AC
            for ds in objects:
                statuses.append(peer.store(encode_dataset(ds), ds.SOPInstanceUID))
        assert 0x0000 in statuses and 0xA700 in statuses, [hex(s) for s in statuses]
        assert set(statuses) <= {0x0000, 0xA700}, [hex(s) for s in statuses]
        by_name = {p.name: p for p in stored(dest)}
        for ds, status in zip(objects, statuses, strict=True):
            name = f"CT_{ds.SOPInstanceUID}.dcm"
            if status == 0:
                assert dataset_bytes(by_name[name]) == encode_dataset(ds)
            else:
                assert name not in by_name
        assert_nothing_half_written(dest)
        assert_logged(node, "STORE-FAILED", "0xA700")
        temp = dest / ".incoming-tmp"
        assert wait_until(lambda: not any(p.is_file() for p in temp.iterdir()), 10), list(
            temp.iterdir()
        )

        assert echoscu(port)
        for path in by_name.values():
            path.unlink()
        path, _ = ok_object(tmp_path, "after")
        assert storescu(port, [path]).returncode == 0
        assert any(p.name.endswith(".dcm") for p in stored(dest))
        node.stop()


# --------------------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(os.urandom(4096), id="random"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(b"\x01\x00\xff\xff\xff\xff" + os.urandom(64), id="huge-associate-rq"),
        pytest.param(b"\x01\x00\x00\x00\x00\x40" + os.urandom(64), id="random-associate-rq"),
        pytest.param(b"\x04\x00\x00\x00\x00\x10" + os.urandom(16), id="p-data-before-assoc"),
    ],
)
@pytest.mark.slow
def test_hardening_garbage_on_the_port_is_dropped_and_node_keeps_serving(
    tmp_path: Path, port: int, start_node: StartNode, garbage: bytes
) -> None:
    node, dest = start(tmp_path, port, start_node, network={"network_timeout_s": 3})
    with RawPeer(port, timeout_s=20) as peer:
        peer.send(garbage)
        started = time.monotonic()
        pdu_type, _ = peer.read_pdu()
        assert pdu_type in (None, 0x07)  # closed or A-ABORT
        assert time.monotonic() - started < 15
    assert node.proc.poll() is None
    assert echoscu(port)
    path, _ = ok_object(tmp_path, "after")
    assert storescu(port, [path]).returncode == 0
    assert len(stored(dest)) == 1
    assert wait_until(lambda: "pynetdicom" in node.output() or "ABORT" in node.output())


def test_hardening_association_proposing_nothing_supported(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node)
    findscu = require_tool("findscu")
    done = subprocess.run(
        [
            findscu,
            *("-S", "-aet", "SENDER", "-aec", "NODE", "-k", "QueryRetrieveLevel=STUDY"),
            *("127.0.0.1", str(port)),
        ],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "No Acceptable Presentation Contexts" in done.stderr, done.stderr
    assert wait_until(lambda: "REJECTED presentation contexts calling_ae=SENDER" in node.output())
    assert_logged(node, "1.2.840.10008.5.1.4.1.2.2.1")  # Study Root FIND, named in the log
    assert echoscu(port)
    assert stored(dest) == []


# --------------------------------------------------------------------------- bad objects


def _without(ds: Dataset, keyword: str) -> Dataset:
    del ds[keyword]
    return ds


def _cut_in_pixel_header() -> bytes:
    data = encode_dataset(make_image())
    return data[: data.index(b"\xe0\x7f\x10\x00") + 5]


def _with_uid(uid: str) -> Dataset:
    ds = make_image()
    ds.SOPInstanceUID = uid
    return ds


BAD_OBJECTS: dict[str, Callable[[], tuple[bytes, str]]] = {
    "truncated-pixel-data": lambda: (encode_dataset(make_image(rows=64, cols=64))[:-100], "T1"),
    "truncated-in-header": lambda: (encode_dataset(make_image())[:200], "T2"),
    "cut-inside-element-header": lambda: (_cut_in_pixel_header(), "T3"),
    "random-bytes": lambda: (os.urandom(700), "T4"),
    "missing-sop-instance-uid": lambda: (
        encode_dataset(_without(make_image(), "SOPInstanceUID")),
        "T5",
    ),
    "invalid-uid-letters": lambda: (encode_dataset(_with_uid("1.2.abc.4")), "T6"),
    "invalid-uid-path": lambda: (encode_dataset(_with_uid("../../etc/passwd")), "T7"),
    "invalid-uid-too-long": lambda: (encode_dataset(_with_uid("1." + "2" * 70)), "T8"),
}


def test_hardening_corrupt_and_invalid_objects_get_c000_and_errors_entry(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node)
    good = make_image()
    with RawPeer(port) as peer:
        assert peer.associate() == PDU_ASSOCIATE_AC
        for name, build in BAD_OBJECTS.items():
            data, _ = build()
            uid = generate_uid(ROOT)
            status = peer.store(data, uid)
            assert 0xC000 <= status <= 0xCFFF, f"{name}: 0x{status:04X}"
        # the same association still stores an honest object
        assert peer.store(encode_dataset(good), good.SOPInstanceUID) == 0x0000
    assert [p.name for p in stored(dest)] == [f"CT_{good.SOPInstanceUID}.dcm"]
    notes = errors_entries(dest)
    assert len(notes) == len(BAD_OBJECTS)
    reasons = " ".join(n.read_text() for n in notes)
    assert "malformed object" in reasons and "SOP Instance UID" in reasons
    for note in notes:
        assert note.with_suffix(".dcm").is_file(), f"no object kept beside {note}"
    assert wait_until(lambda: node.output().count("STORE-FAILED") >= len(BAD_OBJECTS))
    assert_nothing_half_written(dest)


HOSTILE = {
    "../../..": "../../../etc",
    "CON": "CON",
    "NUL.txt": "NUL.txt",
    "300 chars": "X" * 300,
    "control chars": "A\x01B\x1b[31mC\x7f",
    "non-Latin": "山田^太郎=やまだ^たろう",
    "slashes": "a/b\\c:d*e?f|g<h>",
    "dots": "...",
}


def test_hardening_hostile_names_are_filed_safely_and_bytes_kept(
    tmp_path: Path, port: int, start_node: StartNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Build the hostile values pydicom would refuse to write by default.
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    node, dest = start(tmp_path, port, start_node)
    files = []
    sent: dict[str, bytes] = {}
    for index, value in enumerate(HOSTILE.values()):
        ds = make_image(patient_id=value[:64], patient_name=value, instance=index)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.StudyDescription = value
        ds.SeriesDescription = value
        path = save(ds, tmp_path / "send" / f"h{index}.dcm")
        files.append(path)
        sent[ds.SOPInstanceUID] = dataset_bytes(path)
    done = storescu(port, files)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Received Store Response (Success)") == len(HOSTILE)

    objects = stored(dest)
    assert len(objects) == len(HOSTILE)
    root = dest.resolve()
    from dicomnode.dicomtags import WINDOWS_RESERVED

    for path in objects:
        assert path.resolve().is_relative_to(root)
        for part in path.relative_to(dest).parts:
            assert part not in ("", ".", "..")
            assert len(part) <= 80, part
            assert not any(ord(c) < 32 or ord(c) == 127 for c in part), part
            assert not set(part) & set('<>:"/\\|?*'), part
            assert part.split(".")[0].upper().rstrip() not in WINDOWS_RESERVED, part
            assert not part.endswith((".", " ")), part
        uid = path.stem.split("_", 1)[1]
        assert dataset_bytes(path) == sent[uid], f"data set altered: {path}"
    assert_logged(node, "STORED")


# --------------------------------------------------------------------------- service stop


@pytest.mark.slow
def test_hardening_sigterm_mid_transfer_stops_fast_and_keeps_every_ack(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node)
    exe = require_tool("storescu")
    files = [ok_object(tmp_path, f"s{i}", instance=i)[0] for i in range(200)]
    log_path = tmp_path / "storescu.log"
    with log_path.open("w") as log:
        sender = subprocess.Popen(
            [exe, "-v", "-aet", "SENDER", "-aec", "NODE", "127.0.0.1", str(port)]
            + [str(f) for f in files],
            env=peer_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        assert wait_until(
            lambda: log_path.read_text().count("Received Store Response") >= 20, 30, 0.005
        )
        node.proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        assert node.proc.wait(60) == 0, node.output()
        assert time.monotonic() - stopping < 20  # 5 s grace, then abort (loaded machine: slower)
        sender.wait(30)
    acked = acknowledged_by_storescu(log_path.read_text(), files)
    assert len(acked) >= 20
    by_name = {p.name: p for p in stored(dest)}
    for path in acked:
        uid = path_uid(path)
        assert dataset_bytes(by_name[f"CT_{uid}.dcm"]) == dataset_bytes(path)
    assert_nothing_half_written(dest)
    assert_logged(node, "SHUTDOWN requested by signal 15")


def test_hardening_second_signal_forces_exit(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    # A clean stop waits up to stop_grace_s for the open association: long enough here
    # that the second signal always finds it waiting, however slow the machine.
    extra = {"General": {"ae_title": "NODE", "stop_grace_s": 600}}
    node, _ = start(tmp_path, port, start_node, extra=extra)
    with RawPeer(port) as idle:  # an open association makes the clean stop wait
        assert idle.associate() == PDU_ASSOCIATE_AC
        node.proc.send_signal(signal.SIGINT)
        assert wait_until(lambda: "SHUTDOWN requested" in node.output(), 10)
        # Past the default grace (5 s) the clean stop is still waiting: stop_grace_s counts.
        assert stays_false(lambda: node.proc.poll() is not None, 7.0), node.output()
        node.proc.send_signal(signal.SIGINT)
        # forced, not clean: a clean stop would wait for the open association and exit 0
        code = node.proc.wait(60)
    assert code != 0
    assert_logged(node, "forcing exit")


def test_hardening_pdu_longer_than_max_pdu_is_cut_off_not_buffered(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    """A PDU header claiming gigabytes must not make the node buffer what follows."""
    node, dest = start(
        tmp_path, port, start_node, network={"max_pdu_bytes": 65536, "receiver_processes": 1}
    )
    chunk = b"\0" * (1 << 20)
    sent = 0
    with RawPeer(port) as peer:
        assert peer.associate() == PDU_ASSOCIATE_AC
        peer.send(b"\x04\x00\xff\xff\xff\xf0")  # P-DATA-TF of ~4 GiB
        with pytest.raises(OSError):  # reset or broken pipe once the node gives up
            while sent < 512 * len(chunk):
                peer.sock.sendall(chunk)
                sent += len(chunk)
    assert sent < 64 * len(chunk), f"node swallowed {sent >> 20} MiB of one PDU"
    assert_logged(node, "max_pdu_bytes")
    assert echoscu(port)
    assert stored(dest) == []

"""Receiver with real peers: DCMTK storescu/echoscu and a pynetdicom client over 127.0.0.1."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from tests.conftest import peer_env, require_tool, run_storescu, wait_until, write_config
from tests.factories import ROOT, bundled, make_image, rt_set, save

pytestmark = pytest.mark.interop


def dataset_bytes(path: Path) -> bytes:
    """Return the bytes of a DICOM file after its File Meta Information group."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM", path
    # (0002,0000) UL, explicit VR little endian: tag 4, VR 2, length 2, value 4
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


def stored_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*.dcm") if ".incoming-tmp" not in p.parts and "errors" not in p.parts
    )


@pytest.fixture
def node(tmp_path: Path, port: int, start_node):  # type: ignore[no-untyped-def]
    dest = tmp_path / "dest"
    cfg = write_config(
        tmp_path / "node.ini",
        {
            "General": {"ae_title": "DNODE"},
            "Network": {"server_ip": "127.0.0.1", "receive_port": port},
            "Directories": {"destination_dir": dest, "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "SCANNER, MAPPED, PYCLIENT"},
            "AE_Mappings": {"MAPPED": "mapped_folder"},
            "Tools": {"enhanced_mr_conversion": "off"},
        },
    )
    proc = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    return {"port": port, "dest": dest, "proc": proc, "config": cfg}


def storescu(
    port: int, files: list[Path], aet: str = "SCANNER", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return run_storescu(port, files, aet, "DNODE", extra)


def explicit_copy(ds: Dataset, path: Path) -> Path:
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return save(ds, path)


def test_receiver_stores_ct_mr_rt_byte_identical(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    files = [save(make_image("CT"), src / "ct.dcm"), save(make_image("MR"), src / "mr.dcm")]
    files += [explicit_copy(ds, src / f"{name}.dcm") for name, ds in rt_set().items()]
    result = storescu(node["port"], files)
    assert result.returncode == 0, result.stderr
    stored = stored_files(node["dest"])
    assert len(stored) == 5
    by_uid = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in stored}
    for f in files:
        sent = dcmread(f)
        # DCMTK re-encodes some lengths while sending; every element value must survive.
        assert dcmread(by_uid[sent.SOPInstanceUID]) == sent
        assert by_uid[sent.SOPInstanceUID].is_relative_to(node["dest"] / "incoming")
    modalities = sorted(p.name.split("_")[0] for p in stored)
    assert modalities == ["CT", "MR", "RTDOSE", "RTPLAN", "RTSTRUCT"]
    # The STORED line follows the response (and a worker sends INFO lines in batches).
    assert wait_until(lambda: "STORED calling_ae=SCANNER" in node["proc"].output(), 10)


def test_receiver_stores_exact_bytes_sent_by_pynetdicom(
    node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    src = tmp_path / "src"
    files = [save(make_image("CT"), src / "ct.dcm"), save(make_image("MR"), src / "mr.dcm")]
    files += [explicit_copy(ds, src / f"{name}.dcm") for name, ds in rt_set().items()]
    files.append(bundled("MR_small_jpeg_ls_lossless.dcm"))
    ae = AE(ae_title="PYCLIENT")
    for f in files:
        meta = dcmread(f, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node["port"], ae_title="DNODE")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()
    assert statuses == [0] * len(files)
    stored = {
        dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in stored_files(node["dest"])
    }
    for f in files:
        uid = dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(stored[uid]) == dataset_bytes(f), f.name


def test_receiver_accepts_compressed_in_senders_syntax(node) -> None:  # type: ignore[no-untyped-def]
    src = bundled("MR_small_jpeg_ls_lossless.dcm")
    result = storescu(node["port"], [src], extra=("-xt", "-R"))
    assert result.returncode == 0, result.stderr
    [stored] = stored_files(node["dest"])
    got, sent = dcmread(stored), dcmread(src)
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert got.PixelData == sent.PixelData  # still compressed, never decoded


def test_receiver_rejects_untrusted_ae_at_association(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = save(make_image("CT"), tmp_path / "src" / "ct.dcm")
    result = storescu(node["port"], [f], aet="STRANGER")
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr + result.stdout
    echo = subprocess.run(
        [require_tool("echoscu"), "-aet", "STRANGER", "127.0.0.1", str(node["port"])],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo.returncode != 0
    assert stored_files(node["dest"]) == []
    assert wait_until(
        lambda: "REJECTED association calling_ae=STRANGER" in node["proc"].output(), 5
    )
    assert "peer=127.0.0.1:" in node["proc"].output()


def test_receiver_echo_from_trusted_peer(node) -> None:  # type: ignore[no-untyped-def]
    echo = subprocess.run(
        [
            require_tool("echoscu"),
            "-aet",
            "SCANNER",
            "-aec",
            "DNODE",
            "127.0.0.1",
            str(node["port"]),
        ],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo.returncode == 0, echo.stderr


def test_receiver_routes_mapped_ae_to_its_folder(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = save(make_image("CT"), tmp_path / "src" / "ct.dcm")
    assert storescu(node["port"], [f], aet="MAPPED").returncode == 0
    [stored] = stored_files(node["dest"])
    assert stored.is_relative_to(node["dest"] / "mapped_folder")


def _send(port: int, datasets: list[Dataset], aet: str = "PYCLIENT") -> list[int]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DNODE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@pytest.mark.filterwarnings("ignore:Found unknown escape sequence")
def test_receiver_hostile_names_stay_inside_destination(node) -> None:  # type: ignore[no-untyped-def]
    hostile = [
        "../../x",
        "..",
        "CON",
        "NUL.txt",
        "a/b\\c",
        "y" * 300,
        "ctl\x01\x1b[31m",
        "患者^名前",
        "trail. .",
    ]
    datasets = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, pid in enumerate(hostile):
            ds = make_image("CT", patient_id=pid, patient_name=pid, instance=i + 1)
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.StudyDescription = pid
            ds.SeriesDescription = pid
            datasets.append(ds)
    assert _send(node["port"], datasets) == [0] * len(hostile)
    stored = stored_files(node["dest"])
    assert len(stored) == len(hostile)
    dest = node["dest"].resolve()
    for p in stored:
        assert p.resolve().is_relative_to(dest / "incoming")
        assert len(p.relative_to(dest / "incoming").parts) == 4
        for part in p.relative_to(dest).parts:
            assert part.split(".")[0].upper() not in {"CON", "NUL"}
            assert all(ch.isprintable() for ch in part)
            assert len(part) <= 80
    # the data set is never altered: the hostile ID is stored as sent
    ids = {str(dcmread(p).PatientID) for p in stored}
    assert "../../x" in ids and "CON" in ids


def test_receiver_resent_instance_replaces_file(node) -> None:  # type: ignore[no-untyped-def]
    uid = generate_uid(ROOT)
    first = make_image("CT", sop_uid=uid, study_uid=ROOT + "7", series_uid=ROOT + "8")
    second = make_image("CT", sop_uid=uid, study_uid=ROOT + "7", series_uid=ROOT + "8", instance=2)
    assert _send(node["port"], [first, second]) == [0, 0]
    [stored] = stored_files(node["dest"])
    assert dcmread(stored).InstanceNumber == 2


def test_receiver_missing_sop_instance_uid_fails_and_is_kept(
    node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = make_image("CT")
    path = save(ds, tmp_path / "nouid.dcm")
    raw = dcmread(path)
    del raw.SOPInstanceUID  # the command set still carries the UID from the file meta
    raw.save_as(path, enforce_file_format=True)
    ae = AE(ae_title="PYCLIENT")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node["port"], ae_title="DNODE")
    assert assoc.is_established
    try:
        status = int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()
    assert 0xC000 <= status <= 0xCFFF
    assert stored_files(node["dest"]) == []
    notes = list((node["dest"] / "errors").glob("*.log"))
    assert notes and "SOP Instance UID" in notes[0].read_text()
    assert len(list((node["dest"] / "errors").glob("*.dcm"))) == 1
    # and the node keeps serving
    assert _send(node["port"], [make_image("CT")]) == [0]


def _closing_line(node, calling: str, verb: str) -> str:  # type: ignore[no-untyped-def]
    """Wait for the association's closing line from ``calling`` and return it."""
    lines: list[str] = []

    def found() -> bool:
        lines[:] = [
            line
            for line in node["proc"].output().splitlines()
            if f"{verb} association calling_ae={calling} " in line
        ]
        return bool(lines)

    assert wait_until(found, 10), node["proc"].output()[-2000:]
    assert len(lines) == 1, lines
    return lines[0]


def test_receiver_logs_what_each_association_stored(  # type: ignore[no-untyped-def]
    node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [save(make_image("CT", instance=i), tmp_path / f"ct{i}.dcm") for i in range(3)]
    assert storescu(node["port"], files).returncode == 0
    line = _closing_line(node, "SCANNER", "ASSOC-RELEASED")
    assert " stored=3 failed=0 " in line and "reason=released by the peer" in line, line

    nouid = save(make_image("CT"), tmp_path / "nouid.dcm")
    raw = dcmread(nouid)
    del raw.SOPInstanceUID  # the command still carries the UID, from the file meta
    raw.save_as(nouid, enforce_file_format=True)
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # sent as it is
    ae = AE(ae_title="PYCLIENT")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node["port"], ae_title="DNODE")
    assert assoc.is_established
    try:
        sent = [assoc.send_c_store(obj) for obj in (make_image("CT"), nouid, make_image("CT"))]
    finally:
        assoc.release()
    assert [int(status.Status) != 0 for status in sent] == [False, True, False]
    line = _closing_line(node, "PYCLIENT", "ASSOC-RELEASED")
    assert " stored=2 failed=1 " in line, line


def test_receiver_logs_an_association_the_peer_aborted(node) -> None:  # type: ignore[no-untyped-def]
    ae = AE(ae_title="MAPPED")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node["port"], ae_title="DNODE")
    assert assoc.is_established
    assert int(assoc.send_c_store(make_image("CT")).Status) == 0
    assoc.abort()
    line = _closing_line(node, "MAPPED", "ABORTED")
    assert " stored=1 failed=0 " in line and "reason=the peer sent A-ABORT" in line, line


def test_receiver_write_failure_gives_a700_and_errors_entry(
    tmp_path: Path, port: int, start_node
) -> None:  # type: ignore[no-untyped-def]
    dest = tmp_path / "dest"
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the mapped folder should be")
    cfg = write_config(
        tmp_path / "n.ini",
        {
            "General": {"ae_title": "DNODE"},
            "Network": {"receive_port": port},
            "Directories": {"destination_dir": dest, "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "PYCLIENT"},
            "AE_Mappings": {"PYCLIENT": blocker / "sub"},
            "Tools": {"enhanced_mr_conversion": "off"},
        },
    )
    proc = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    [status] = _send(port, [make_image("CT")])
    assert status == 0xA700
    kept = list((dest / "errors").glob("*.dcm"))
    notes = list((dest / "errors").glob("*.log"))
    assert len(kept) == 1 and len(notes) == 1
    assert "cannot write" in notes[0].read_text()
    assert wait_until(lambda: "STORE-FAILED" in proc.output(), 10)


def test_receiver_two_concurrent_senders(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sets = []
    for k in range(2):
        study = generate_uid(ROOT)
        series = generate_uid(ROOT)
        sets.append(
            [
                save(
                    make_image("CT", study_uid=study, series_uid=series, instance=i),
                    tmp_path / f"s{k}" / f"{i}.dcm",
                )
                for i in range(40)
            ]
        )
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda fs=fs: results.append(storescu(node["port"], fs).returncode))
        for fs in sets
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0, 0]
    assert len(stored_files(node["dest"])) == 80


def test_receiver_killed_sender_leaves_no_final_file(node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    big = make_image("CT", rows=4096, cols=4096)  # 32 MB of pixels
    path = save(big, tmp_path / "src" / "big.dcm")
    exe = require_tool("storescu")
    proc = subprocess.Popen(
        [
            exe,
            "-aet",
            "SCANNER",
            "-aec",
            "DNODE",
            "--max-send-pdu",
            "4096",
            "127.0.0.1",
            str(node["port"]),
            str(path),
        ],
        env=peer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmpdir = node["dest"] / ".incoming-tmp"
    started = wait_until(
        lambda: any(f.stat().st_size > 100_000 for f in tmpdir.glob("*")), 20, 0.005
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert started, "transfer never started"
    assert stored_files(node["dest"]) == []
    # the node keeps serving
    assert _send(node["port"], [make_image("CT")]) == [0]
    assert len(stored_files(node["dest"])) == 1

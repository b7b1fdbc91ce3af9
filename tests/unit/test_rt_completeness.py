"""RT completeness: references read from real RT files, what a group misses, wait/send/park.

Uses pydicom's bundled ``rtplan.dcm``, ``rtdose.dcm``, ``rtstruct.dcm`` (and variants
re-keyed by :func:`tests.factories.rt_set`), a generated RT Beams Treatment Record and
RT Ion Plan, the forwarder's own header read (:func:`inspect_file`) and a real SQLite
ledger for the "delivered before" lookup. No sockets, no threads.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path, PurePosixPath

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from dicomnode.config import DEFAULT_SEND_ORDER, DestinationConfig, ForwarderConfig, parse
from dicomnode.errors import ConfigError
from dicomnode.forwarder import header as header_mod
from dicomnode.forwarder.batching import ObjectInfo, order_objects
from dicomnode.forwarder.completeness import (
    RTPLAN,
    RTSTRUCT,
    SERIES,
    CompletenessTracker,
    GateAction,
    Reference,
    describe_missing,
    missing_references,
    references_of,
)
from dicomnode.forwarder.header import inspect_file
from dicomnode.forwarder.job import GroupJob, JobFile
from dicomnode.forwarder.rtgate import RtGate, job_fingerprint, snapshot_fingerprint
from dicomnode.integrity import Examination
from dicomnode.ledger import queries
from dicomnode.ledger.schema import open_ledger
from tests.factories import ROOT, bundled, make_image, rt_set, save

BEAMS_RECORD = "1.2.840.10008.5.1.4.1.1.481.4"
SUMMARY_RECORD = "1.2.840.10008.5.1.4.1.1.481.7"
ION_PLAN = "1.2.840.10008.5.1.4.1.1.481.8"


def info_of(path: Path, name: str | None = None) -> ObjectInfo:
    """Read one file with the forwarder's own header read."""
    st = path.stat()
    key = PurePosixPath(name or path.name)
    found = inspect_file(JobFile(path, key.as_posix(), key, st.st_size, st.st_mtime_ns), key)
    assert isinstance(found, ObjectInfo), found
    return found


def group_of(tmp_path: Path, datasets: dict[str, Dataset]) -> list[ObjectInfo]:
    return [info_of(save(ds, tmp_path / f"{name}.dcm")) for name, ds in datasets.items()]


# --------------------------------------------------------------------------- references


def test_references_of_pydicoms_bundled_rt_files() -> None:
    """rtdose → its plan, rtplan → its structure set, rtstruct → its image series (with study)."""
    plan, dose, struct = (
        dcmread(bundled(n), force=True) for n in ("rtplan.dcm", "rtdose.dcm", "rtstruct.dcm")
    )
    assert references_of(dose, "RTDOSE", dose.SOPClassUID) == (
        Reference(RTPLAN, "1.2.123.456.78.9.0123.4567.89012345678901"),
    )
    # the plan's own ReferencedRTPlanSequence (a related plan) is not a requirement
    assert references_of(plan, "RTPLAN", plan.SOPClassUID) == (
        Reference(RTSTRUCT, "1.2.333.444.55.6.7777.88888"),
    )
    [series] = references_of(struct, "RTSTRUCT", struct.SOPClassUID)
    assert series == Reference(SERIES, "1.2.826.0.1.3680043.8.498.2010020400001.2.1.1")
    assert series.study_uid == "1.2.826.0.1.3680043.8.498.2010020400001.2.1"


def test_references_of_images_and_other_objects_are_none() -> None:
    ct = make_image()
    assert references_of(ct, "CT", ct.SOPClassUID) == ()


def record(sop_class: str, plan_uid: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(ROOT)
    ds.Modality = "RTRECORD"
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
    item.ReferencedSOPInstanceUID = plan_uid
    ds.ReferencedRTPlanSequence = Sequence([item])
    return ds


@pytest.mark.parametrize("sop_class", [BEAMS_RECORD, SUMMARY_RECORD])
def test_references_of_treatment_records_name_their_plan(sop_class: str) -> None:
    plan_uid = generate_uid(ROOT)
    ds = record(sop_class, plan_uid)
    assert references_of(ds, "RTRECORD", sop_class) == (Reference(RTPLAN, plan_uid),)


def test_references_of_ion_plan_names_its_structure_set() -> None:
    plan = dcmread(bundled("rtplan.dcm"), force=True)
    plan.SOPClassUID = ION_PLAN
    plan.Modality = "RTPLAN"
    assert [r.kind for r in references_of(plan, "RTPLAN", ION_PLAN)] == [RTSTRUCT]


def test_references_of_contour_images_kept_as_evidence_and_duplicates_dropped() -> None:
    struct = rt_set(image_series="1.2.3.4")["rtstruct"]
    series = struct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    images = []
    for i in range(40):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = f"1.2.3.4.{i}"
        images.append(item)
    series.RTReferencedSeriesSequence[0].ContourImageSequence = Sequence(images)
    series.RTReferencedSeriesSequence.append(series.RTReferencedSeriesSequence[0])  # a duplicate
    [ref] = references_of(struct, "RTSTRUCT", struct.SOPClassUID)
    assert ref.uid == "1.2.3.4" and len(ref.images) == 32 and ref.images[0] == "1.2.3.4.0"


def test_references_of_a_hostile_object_are_bounded() -> None:
    dose = rt_set()["rtdose"]
    item = dose.ReferencedRTPlanSequence[0]
    items = []
    for i in range(500):
        copy = Dataset()
        copy.ReferencedSOPClassUID = item.ReferencedSOPClassUID
        copy.ReferencedSOPInstanceUID = f"1.2.3.{i}"
        items.append(copy)
    dose.ReferencedRTPlanSequence = Sequence(items)
    refs = references_of(dose, "RTDOSE", dose.SOPClassUID)
    assert len(refs) == 64
    text = describe_missing(refs)
    assert text.endswith(",+44 more") and text.count("RTPLAN:") == 20


def test_inspect_file_collects_references_in_its_one_header_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forwarder's single header walk returns the references (no second parse)."""
    reads: list[Path] = []
    real = header_mod.examine

    def counting(path: Path, wanted: frozenset[int] = frozenset()) -> Examination:
        reads.append(path)
        return real(path, wanted)

    monkeypatch.setattr(header_mod, "examine", counting)
    rt = rt_set(image_series="1.2.3.4")
    infos = {n: info_of(save(ds, tmp_path / f"{n}.dcm")) for n, ds in rt.items()}
    assert len(reads) == 3
    assert infos["rtdose"].references == (Reference(RTPLAN, str(rt["rtplan"].SOPInstanceUID)),)
    assert infos["rtplan"].references == (Reference(RTSTRUCT, str(rt["rtstruct"].SOPInstanceUID)),)
    assert infos["rtstruct"].references == (Reference(SERIES, "1.2.3.4"),)
    assert infos["rtplan"].series_instance_uid == str(rt["rtplan"].SeriesInstanceUID)


@pytest.mark.parametrize("implicit", [False, True])
def test_raw_references_equal_pydicoms(tmp_path: Path, implicit: bool) -> None:
    """The forwarder decodes the reference sequences from raw bytes: as pydicom reads them."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    rt = rt_set(image_series="1.2.3.4")
    # nested undefined-length items (as many exports write them) and several references
    rt["rtdose"].ReferencedRTPlanSequence.append(Dataset())
    rt["rtdose"].ReferencedRTPlanSequence[
        -1
    ].ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.5"
    rt["rtdose"].ReferencedRTPlanSequence[-1].ReferencedSOPInstanceUID = "1.2.3.99"
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    for name, ds in rt.items():
        ds.file_meta.TransferSyntaxUID = syntax
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
        got = info_of(path).references
        full = dcmread(path)
        expected = references_of(full, str(full.Modality), str(full.SOPClassUID))
        assert got == expected and got, name
        assert [r.study_uid for r in got] == [r.study_uid for r in expected]
        assert [r.images for r in got] == [r.images for r in expected]


def test_inspect_file_of_rt_objects_does_not_import_pydicom(tmp_path: Path) -> None:
    """References come from the raw walk: forwarding an RT set keeps pydicom out (memory)."""
    import subprocess
    import sys

    paths = [save(ds, tmp_path / f"{n}.dcm") for n, ds in rt_set(image_series="1.2.3").items()]
    code = (
        "import sys\n"
        "from pathlib import Path, PurePosixPath\n"
        "from dicomnode.forwarder.header import inspect_file\n"
        "from dicomnode.forwarder.job import JobFile\n"
        "for p in map(Path, sys.argv[1:]):\n"
        "    st = p.stat()\n"
        "    jf = JobFile(p, p.name, PurePosixPath(p.name), st.st_size, st.st_mtime_ns)\n"
        "    assert inspect_file(jf, PurePosixPath(p.name)).references, p\n"
        "print('pydicom' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_inspect_file_reads_references_of_a_bare_data_set(tmp_path: Path) -> None:
    """rtstruct.dcm has no File Meta (as DCMTK's storescu sends it): references still read."""
    info = info_of(bundled("rtstruct.dcm"))
    assert [r.kind for r in info.references] == [SERIES]


def test_inspect_file_sends_an_object_whose_references_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reference sequence pydicom cannot decode: one line, the object is sent unchecked."""

    def broken(*_args: object) -> list[dict[int, tuple[bytes, bytes]]]:
        raise ValueError("item length beyond the sequence")

    monkeypatch.setattr(header_mod, "sequence_items", broken)
    info = info_of(save(rt_set()["rtdose"], tmp_path / "dose\nx.dcm"))
    assert info.references == ()
    [line] = [r.getMessage() for r in caplog.records if "REFERENCES-UNREADABLE" in r.getMessage()]
    assert "item length beyond the sequence" in line


# --------------------------------------------------------------------------- missing


def test_missing_plan_and_structure_set_of_a_half_export(tmp_path: Path) -> None:
    rt = rt_set()
    infos = group_of(tmp_path, {"rtdose": rt["rtdose"]})
    assert missing_references(infos) == (Reference(RTPLAN, str(rt["rtplan"].SOPInstanceUID)),)
    infos = group_of(tmp_path, {"rtdose": rt["rtdose"], "rtplan": rt["rtplan"]})
    assert missing_references(infos) == (Reference(RTSTRUCT, str(rt["rtstruct"].SOPInstanceUID)),)
    assert (
        describe_missing(missing_references(infos)) == f"RTSTRUCT:{rt['rtstruct'].SOPInstanceUID}"
    )
    infos = group_of(tmp_path, rt)
    assert missing_references(infos) == ()


def test_missing_image_series_of_a_structure_set(tmp_path: Path) -> None:
    """A series is present with at least one of its objects in the group."""
    series = generate_uid(ROOT)
    rt = rt_set(image_series=series)
    assert missing_references(group_of(tmp_path, rt)) == (Reference(SERIES, series),)
    one = make_image(series_uid=series, instance=3)
    assert missing_references(group_of(tmp_path, {**rt, "ct3": one})) == ()
    other = make_image(instance=1)  # another series does not count
    assert missing_references(group_of(tmp_path, {**rt, "ct": other})) == (
        Reference(SERIES, series),
    )


def test_missing_series_present_through_a_contour_image(tmp_path: Path) -> None:
    series = generate_uid(ROOT)
    rt = rt_set(image_series=series)
    ct = make_image(instance=1)  # its Series Instance UID differs, its SOP UID is referenced
    item = Dataset()
    item.ReferencedSOPClassUID = ct.SOPClassUID
    item.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    ref_series = rt["rtstruct"].ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    ref_series.RTReferencedSeriesSequence[0].ContourImageSequence = Sequence([item])
    assert missing_references(group_of(tmp_path, {**rt, "ct": ct})) == ()


def test_missing_asks_delivered_only_for_what_the_group_lacks(tmp_path: Path) -> None:
    rt = rt_set()
    infos = group_of(tmp_path, {"rtdose": rt["rtdose"], "rtplan": rt["rtplan"]})
    asked: list[Reference] = []

    def delivered(ref: Reference) -> bool:
        asked.append(ref)
        return True

    assert missing_references(infos, delivered) == ()
    assert asked == [Reference(RTSTRUCT, str(rt["rtstruct"].SOPInstanceUID))]


# --------------------------------------------------------------------------- wait / send / park


FP = {name: frozenset({name}) for name in ("fp", "fp1", "fp2", "fp3")}


def test_tracker_waits_announces_once_and_holds_until_change_or_deadline() -> None:
    t = CompletenessTracker()
    miss = (Reference(RTSTRUCT, "1.2"),)
    v = t.decide("G", "default", FP["fp1"], miss, 100.0, 60.0, "send")
    assert (v.action, v.announce, v.waited_s) == (GateAction.WAIT, True, 0.0)
    assert t.should_hold("G", "default", FP["fp1"], 130.0, 60.0)
    assert not t.should_hold("G", "default", FP["fp2"], 130.0, 60.0)  # changed: check again
    assert not t.should_hold("G", "other", FP["fp1"], 130.0, 60.0)  # per destination
    v = t.decide("G", "default", FP["fp2"], miss, 130.0, 60.0, "send")
    assert (v.action, v.announce, v.waited_s) == (GateAction.WAIT, False, 30.0)  # no second line
    v = t.decide("G", "default", FP["fp3"], (Reference(RTPLAN, "9"),), 131.0, 60.0, "send")
    assert v.announce  # something else is missing now: say so
    assert not t.should_hold("G", "default", FP["fp3"], 160.0, 60.0)  # wait over (from first ready)
    assert set(t.waiting()) == {("G", "default")}


def test_tracker_after_the_wait_sends_with_one_warning() -> None:
    t = CompletenessTracker()
    miss = (Reference(RTPLAN, "1.2"),)
    t.decide("G", "default", FP["fp"], miss, 0.0, 10.0, "send")
    v = t.decide("G", "default", FP["fp"], miss, 10.0, 10.0, "send")
    assert (v.action, v.announce, v.missing) == (GateAction.SEND_INCOMPLETE, True, miss)
    v = t.decide(
        "G", "default", FP["fp"], miss, 50.0, 10.0, "send"
    )  # a retry after network trouble
    assert (v.action, v.announce) == (GateAction.SEND_INCOMPLETE, False)
    assert t.waiting() == {}
    v = t.decide("G", "default", frozenset(), miss, 51.0, 10.0, "send")  # files sent meanwhile
    assert v.action is GateAction.SEND_INCOMPLETE
    # a new export into the same folder (the receiver's AE folder) waits again
    v = t.decide("G", "default", frozenset({"new"}), miss, 60.0, 10.0, "send")
    assert (v.action, v.announce, v.waited_s) == (GateAction.WAIT, True, 0.0)


def test_tracker_after_the_wait_parks() -> None:
    t = CompletenessTracker()
    miss = (Reference(RTPLAN, "1.2"),)
    t.decide("G", "default", FP["fp"], miss, 0.0, 10.0, "park")
    v = t.decide("G", "default", FP["fp"], miss, 12.0, 10.0, "park")
    assert (v.action, v.announce, v.waited_s) == (GateAction.PARK, True, 12.0)


def test_tracker_completion_and_zero_wait() -> None:
    t = CompletenessTracker()
    miss = (Reference(RTSTRUCT, "1.2"),)
    assert t.decide("G", "d", FP["fp"], miss, 0.0, 0.0, "park").action is GateAction.SEND  # 0 = off
    t.decide("G", "d", FP["fp"], miss, 0.0, 100.0, "park")
    v = t.decide("G", "d", FP["fp2"], (), 20.0, 100.0, "park")
    assert (v.action, v.announce, v.waited_s) == (GateAction.SEND, True, 20.0)
    assert t.waiting() == {}
    v = t.decide("G", "d", FP["fp2"], (), 21.0, 100.0, "park")
    assert (v.action, v.announce) == (GateAction.SEND, False)
    t.decide("G", "d", FP["fp"], miss, 30.0, 100.0, "park")
    t.forget("G")
    assert t.waiting() == {}


# --------------------------------------------------------------------------- the gate and its config


def _job(tmp_path: Path, datasets: dict[str, Dataset]) -> tuple[GroupJob, list[ObjectInfo]]:
    files, infos = [], []
    for name, ds in datasets.items():
        path = save(ds, tmp_path / "G" / f"{name}.dcm")
        st = path.stat()
        jf = JobFile(
            path, f"G/{name}.dcm", PurePosixPath(f"{name}.dcm"), st.st_size, st.st_mtime_ns
        )
        files.append(jf)
        infos.append(info_of(path, f"G/{name}.dcm"))
    return GroupJob("G", tuple(files), tmp_path, tmp_path), infos


def test_gate_waits_per_destination_with_override_and_logs_one_waiting_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    cfg = ForwarderConfig(target_aet="T", target_ip="127.0.0.1", rt_completeness_wait_s=300.0)
    quick = DestinationConfig(
        name="QA", ae_title="QA", host="127.0.0.1", rt_completeness_wait_s=5.0
    )
    gate = RtGate(cfg, [quick], None, clock=lambda: now[0])
    rt = rt_set()
    job, infos = _job(tmp_path, {"rtdose": rt["rtdose"], "rtplan": rt["rtplan"]})
    caplog.set_level("INFO", logger="dicomnode")
    assert gate.check(job, infos).action is GateAction.WAIT
    assert gate.check(job, infos, "QA").action is GateAction.WAIT
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("WAITING")]
    assert len(lines) == 2 and f"missing=RTSTRUCT:{rt['rtstruct'].SOPInstanceUID}" in lines[0]
    assert "destination=default" in lines[0] and "destination=QA" in lines[1]
    assert gate.wait_s("QA") == 5.0 and gate.wait_s("default") == 300.0
    assert gate.waiting()["G"].startswith("QA: missing RTSTRUCT:")
    now[0] += 6
    gate.check(job, infos)  # same missing, within the wait: no second line
    assert len([r for r in caplog.records if r.getMessage().startswith("WAITING")]) == 2
    caplog.clear()
    assert gate.check(job, infos, "QA").action is GateAction.SEND_INCOMPLETE
    [warn] = [r for r in caplog.records if r.getMessage().startswith("RT-INCOMPLETE")]
    assert warn.levelname == "WARNING" and "destination=QA" in warn.getMessage()
    assert f"RTSTRUCT:{rt['rtstruct'].SOPInstanceUID}" in warn.getMessage()


def test_gate_escapes_peer_strings_in_its_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = ForwarderConfig(target_aet="T", target_ip="127.0.0.1")
    gate = RtGate(cfg)
    rt = rt_set()
    rt["rtplan"].ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = "1.2\nFORGED line"
    job, infos = _job(tmp_path, {"rtplan": rt["rtplan"]})
    caplog.set_level("INFO", logger="dicomnode")
    gate.check(job, infos)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("WAITING")]
    assert "\n" not in line


def test_gate_should_hold_matches_the_watch_folder_snapshot(tmp_path: Path) -> None:
    from dicomnode.forwarder.batching import group_entries
    from dicomnode.forwarder.job import job_from_snapshot
    from dicomnode.forwarder.watcher import scan_folder

    rt = rt_set()
    save(rt["rtdose"], tmp_path / "G" / "dose.dcm")
    snap = group_entries(scan_folder(tmp_path))["G"]
    job = job_from_snapshot(tmp_path, snap)
    assert job_fingerprint(job) == snapshot_fingerprint(snap)
    now = [0.0]
    gate = RtGate(ForwarderConfig(target_aet="T", target_ip="h"), clock=lambda: now[0])
    infos = [info_of(jf.path, jf.display) for jf in job.files]
    gate.check(job, infos)
    assert gate.should_hold("G", snap)
    save(rt["rtplan"], tmp_path / "G" / "plan.dcm")
    assert not gate.should_hold("G", group_entries(scan_folder(tmp_path))["G"])

    # a destination's share of a bigger group: the whole group is what the folder shows
    whole = job_from_snapshot(tmp_path, group_entries(scan_folder(tmp_path))["G"])
    share = GroupJob(
        "G", tuple(jf for jf in whole.files if jf.display == "G/dose.dcm"), tmp_path, tmp_path
    )
    dose_only = [info_of(jf.path, jf.display) for jf in share.files]
    assert gate.check(share, dose_only, "QA", whole=whole).action is GateAction.WAIT
    assert gate.should_hold("G", group_entries(scan_folder(tmp_path))["G"], "QA")


def test_config_rt_keys_defaults_overrides_and_errors(tmp_path: Path) -> None:
    base = "[Security]\ntrusted_ae_titles = A\n"
    cfg = parse(base, "t.ini", tmp_path)
    assert cfg.forwarder.rt_completeness_wait_s == 300.0
    assert cfg.forwarder.rt_incomplete_action == "send"
    text = base + (
        "[FolderWatcher]\nrt_completeness_wait_s = 0\nrt_incomplete_action = PARK\n"
        "[Destination:TPS]\nae_title = TPS\nhost = 127.0.0.1\nrt_completeness_wait_s =\n"
        "[Destination:QA]\nae_title = QA\nhost = 127.0.0.1\nrt_completeness_wait_s = 30\n"
    )
    cfg = parse(text, "t.ini", tmp_path)
    assert cfg.forwarder.rt_completeness_wait_s == 0.0
    assert cfg.forwarder.rt_incomplete_action == "park"
    by_name = {d.name: d for d in cfg.destinations}
    assert by_name["TPS"].rt_completeness_wait_s is None
    assert by_name["QA"].rt_completeness_wait_s == 30.0
    gate = RtGate(cfg.forwarder, cfg.destinations)
    assert (gate.wait_s("TPS"), gate.wait_s("QA"), gate.wait_s("default")) == (0.0, 30.0, 0.0)
    with pytest.raises(ConfigError, match="rt_incomplete_action"):
        parse(base + "[FolderWatcher]\nrt_incomplete_action = drop\n", "t.ini", tmp_path)
    with pytest.raises(ConfigError, match="rt_completeness_wait_s"):
        parse(base + "[FolderWatcher]\nrt_completeness_wait_s = -1\n", "t.ini", tmp_path)


# --------------------------------------------------------------------------- order


def test_send_order_images_structure_set_plan_dose_records(tmp_path: Path) -> None:
    """The default order sends images, then RTSTRUCT, RTPLAN, RTDOSE, treatment records."""
    assert DEFAULT_SEND_ORDER == ("IMAGES", "OTHER", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD")
    rt = rt_set()
    rec = record(BEAMS_RECORD, str(rt["rtplan"].SOPInstanceUID))
    rec.file_meta = rt["rtplan"].file_meta.copy()
    rec.file_meta.MediaStorageSOPClassUID = BEAMS_RECORD
    rec.file_meta.MediaStorageSOPInstanceUID = rec.SOPInstanceUID
    rec.PatientID = "PAT001"
    datasets = {
        "a_rec": rec,
        "b_dose": rt["rtdose"],
        "c_plan": rt["rtplan"],
        "d_struct": rt["rtstruct"],
    }
    datasets["e_ct"] = make_image()
    infos = group_of(tmp_path, datasets)
    ordered = [o.rel_path.name for o in order_objects(infos, DEFAULT_SEND_ORDER)]
    assert ordered == ["e_ct.dcm", "d_struct.dcm", "c_plan.dcm", "b_dose.dcm", "a_rec.dcm"]
    assert missing_references(infos) == ()


# --------------------------------------------------------------------------- ledger


def _ledger(tmp_path: Path) -> tuple[Path, sqlite3.Connection]:
    path = tmp_path / "ledger.sqlite"
    conn = open_ledger(path)
    return path, conn


def _forwarded(conn: sqlite3.Connection, **row: object) -> None:
    columns = ["ts", "kind", *row]
    values = [time.time(), "forwarded", *row.values()]
    with conn:
        conn.execute(
            f"INSERT INTO events ({', '.join(columns)}) VALUES ({', '.join('?' * len(values))})",
            values,
        )


def test_ledger_delivery_lookup_per_destination_object_and_series(tmp_path: Path) -> None:
    path, conn = _ledger(tmp_path)
    _forwarded(conn, sop_uid="1.1", destination="TPS@h:104")
    _forwarded(conn, sop_uid="2.1", study_uid="2", series_uid="2.9", destination="TPS@h:104")
    with conn:
        conn.execute(
            "INSERT INTO events (ts, kind, sop_uid, destination) VALUES (?, 'forward_refused', '3.1', 'TPS@h:104')",
            (time.time(),),
        )
    lookup = queries.DeliveryLookup(path)
    assert lookup.objects("TPS@h:104", ["0.0", "1.1"])
    assert not lookup.objects("QA@h:104", ["1.1"])  # another destination
    assert not lookup.objects("TPS@h:104", ["3.1"])  # refused is not delivered
    assert not lookup.objects("TPS@h:104", [])
    assert lookup.series("TPS@h:104", "2", "2.9")
    assert not lookup.series("TPS@h:104", "", "2.9")
    assert not lookup.series("QA@h:104", "2", "2.9")
    plan = conn.execute(
        "EXPLAIN QUERY PLAN " + queries.delivered_sql(2), ("a", "b", "forwarded", "d")
    ).fetchall()
    assert any("events_sop" in str(tuple(r)) for r in plan)  # bounded: probes by SOP UID
    lookup.close()


def test_ledger_delivery_lookup_without_a_ledger_says_not_delivered(tmp_path: Path) -> None:
    lookup = queries.DeliveryLookup(tmp_path / "none.sqlite")
    assert not lookup.objects("TPS@h:104", ["1.1"])


def test_gate_counts_what_the_ledger_shows_delivered_to_that_destination(tmp_path: Path) -> None:
    path, conn = _ledger(tmp_path)
    rt = rt_set()
    _forwarded(conn, sop_uid=str(rt["rtstruct"].SOPInstanceUID), destination="T@127.0.0.1:104")
    cfg = ForwarderConfig(target_aet="T", target_ip="127.0.0.1", target_port=104)
    other = DestinationConfig(name="QA", ae_title="QA", host="127.0.0.1", port=11112)
    gate = RtGate(cfg, [other], queries.DeliveryLookup(path))
    job, infos = _job(tmp_path, {"rtdose": rt["rtdose"], "rtplan": rt["rtplan"]})
    assert gate.check(job, infos).action is GateAction.SEND
    assert gate.check(job, infos, "QA").action is GateAction.WAIT


def test_uid_mismatch_is_warned_once_per_version_of_a_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A group waiting for its RT references is looked at again and again: one warning per file."""
    import os
    import shutil

    from pydicom.data import get_testdata_file

    from dicomnode.forwarder.outcome import ParkReason

    path = tmp_path / "rtplan.dcm"  # pydicom's rtplan.dcm: File Meta and data set UIDs differ
    shutil.copyfile(str(get_testdata_file("rtplan.dcm")), path)

    def job() -> JobFile:
        st = path.stat()
        return JobFile(
            path, "g/rtplan.dcm", PurePosixPath("rtplan.dcm"), st.st_size, st.st_mtime_ns
        )

    caplog.set_level(logging.WARNING, logger="dicomnode")
    for _ in range(3):
        assert not isinstance(inspect_file(job(), PurePosixPath("0/rtplan.dcm")), ParkReason)
    assert caplog.text.count("UID-MISMATCH") == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new version
    inspect_file(job(), PurePosixPath("0/rtplan.dcm"))
    assert caplog.text.count("UID-MISMATCH") == 2

"""Filing by identity: one folder per patient, study and series, however its objects describe it.

Several systems make the objects of one study (scanner: CT; planning system:
RTSTRUCT/RTPLAN/RTDOSE) and spell its descriptive attributes differently. The
node runs a receiver process pool; several DCMTK storescu senders send at the
same moment, the node is restarted, and the folders are counted.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.organise import FolderLevel, folder_plan
from dicomnode.storage import FolderResolver
from tests.conftest import peer_env, require_tool, wait_until, write_config
from tests.factories import ROOT, make_image, rt_set, save

pytestmark = pytest.mark.interop

LAYOUT = "{patient}/{study}/{series}"


def _study_objects(folder: Path, patient_id: str, study_uid: str) -> list[list[Path]]:
    """Objects of one study as four systems make them; one list of files per sender."""
    ct_series = generate_uid(ROOT)
    senders: list[list[Path]] = []
    # Two scanner consoles send halves of one CT series, with different descriptions.
    for half, (name, desc, series_desc) in enumerate(
        [("DOE^JOHN", "Pelvis", "Planning CT"), ("Doe^John^^^", "PELVIS RT", "CT 2mm")]
    ):
        files = []
        for i in range(4):
            ds = make_image(
                "CT",
                patient_id=patient_id,
                patient_name=name,
                study_uid=study_uid,
                series_uid=ct_series,
                instance=half * 4 + i + 1,
            )
            ds.StudyDescription = desc
            ds.SeriesDescription = series_desc
            files.append(save(ds, folder / f"ct{half}" / f"{i}.dcm"))
        senders.append(files)
    # The planning system: no StudyDate on the RTSTRUCT, its own name spelling.
    rt = rt_set(patient_id=patient_id, study_uid=study_uid)
    rt_files = []
    for kind, ds in rt.items():
        ds.PatientName = "DOE^J"
        ds.StudyDescription = "Plan 1"
        if kind == "rtstruct":
            ds.StudyDate = ""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rt_files.append(save(ds, folder / "rt" / f"{kind}.dcm"))
    senders.append(rt_files)
    # A fourth system: an MR series of the same study without any description.
    mr_series = generate_uid(ROOT)
    mr = []
    for i in range(3):
        ds = make_image("MR", patient_id=patient_id, patient_name="", study_uid=study_uid)
        ds.SeriesInstanceUID = mr_series
        ds.InstanceNumber = i + 1
        del ds.StudyDescription, ds.SeriesDescription, ds.StudyDate
        mr.append(save(ds, folder / "mr" / f"{i}.dcm"))
    senders.append(mr)
    return senders


def _series_uids(files: list[list[Path]]) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for s in files for f in s}


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _send_at_once(port: int, senders: list[list[Path]]) -> None:
    storescu = require_tool("storescu")
    procs = [
        subprocess.Popen(
            [storescu, "-aet", f"SYS{i}", "127.0.0.1", str(port), *map(str, files)],
            env=peer_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i, files in enumerate(senders)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode(errors="replace")


def test_filing_one_folder_per_patient_study_series_with_concurrent_senders_and_restart(
    tmp_path: Path, port: int, start_node
) -> None:  # type: ignore[no-untyped-def]
    dest = tmp_path / "dest"
    cfg = write_config(
        tmp_path / "c.ini",
        {
            "Network": {"receive_port": port, "receiver_processes": 2},
            "Directories": {"destination_dir": dest, "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": ", ".join(f"SYS{i}" for i in range(12))},
            "Tools": {"enhanced_mr_conversion": "off"},
        },
    )
    node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    assert wait_until(lambda: "processes=2" in node.output(), 60)
    studies = {}
    for n in range(3):
        uid = generate_uid(ROOT)
        studies[f"PID{n}"] = (uid, _study_objects(tmp_path / f"src{n}", f"PID{n}", uid))
    expected_files = sum(len(f) for _, senders in studies.values() for f in senders)
    # every sender of every patient at the same moment: 4 senders x 3 patients
    _send_at_once(port, [files for _, senders in studies.values() for files in senders])
    incoming = dest / "incoming"

    def check(total: int) -> None:
        assert len(list(incoming.rglob("*.dcm"))) == total
        patients = _visible_dirs(incoming)
        assert len(patients) == len(studies), [p.name for p in patients]
        for patient in patients:
            [study] = _visible_dirs(patient)
            pid = patient.name.split("_")[0]
            assert len(_visible_dirs(study)) == len(_series_uids(studies[pid][1])), [
                s.name for s in _visible_dirs(study)
            ]

    check(expected_files)
    # After a restart, objects with yet other descriptions join the same folders.
    node.stop()
    node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    assert wait_until(lambda: "processes=2" in node.output(), 60)
    late = []
    for pid, (uid, senders) in studies.items():
        ds = make_image("CT", patient_id=pid, patient_name="LATE^ARRIVAL", study_uid=uid)
        ds.SeriesInstanceUID = dcmread(senders[0][0], stop_before_pixels=True).SeriesInstanceUID
        ds.StudyDescription = "Re-sent by another system"
        ds.SeriesDescription = "another text"
        ds.StudyDate = "19991231"
        late.append(save(ds, tmp_path / "late" / f"{pid}.dcm"))
    _send_at_once(port, [late])
    check(expected_files + len(late))


def _resolve_in_process(root: str, name: str, ready: Any, start: Any) -> str:
    plan = (FolderLevel(f"patient {name}_0123456789ab", "0123456789ab"),)
    ready.put(name)
    assert start.wait(300)
    return str(FolderResolver().resolve(Path(root), plan))


def test_filing_resolver_creates_one_folder_when_processes_race(tmp_path: Path) -> None:
    """Eight processes create the folder of one identity at the same moment, each with its own name."""
    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager()
    ready, start = manager.Queue(), manager.Event()
    with manager, ctx.Pool(8) as pool:
        results = [
            pool.apply_async(_resolve_in_process, (str(tmp_path), str(i), ready, start))
            for i in range(8)
        ]
        for _ in range(8):  # every process is at the start line: release them together
            ready.get(timeout=300)
        start.set()
        folders = {r.get(300) for r in results}
    assert len(folders) == 1
    assert [p.name for p in _visible_dirs(tmp_path)] == [Path(folders.pop()).name]


def test_filing_plan_of_header_joins_folder_named_by_another_description(tmp_path: Path) -> None:
    first = make_image("CT", patient_name="DOE^JOHN")
    second = Dataset()
    second.update(first)
    second.PatientName = "Doe^John^^^"
    second.StudyDescription = "other"
    del second.StudyDate
    resolver = FolderResolver()
    a = resolver.resolve(tmp_path, folder_plan(first, LAYOUT))
    b = FolderResolver().resolve(tmp_path, folder_plan(second, LAYOUT))  # a fresh process
    assert a == b


@pytest.mark.parametrize("layout", [LAYOUT, "{patient_id}/{study}"])
def test_filing_reserved_patient_names_are_forwarded_in_a_chained_node(
    tmp_path: Path, port: int, start_node, layout: str
) -> None:  # type: ignore[no-untyped-def]
    """Patients whose ID sanitises to a name the forwarder skips are filed under a name it sends."""
    from tests.integration.test_forward import TARGET_AET, StoreSCP

    target = StoreSCP(tmp_path / "target").start()
    try:
        watch = tmp_path / "watch"
        cfg = write_config(
            tmp_path / "c.ini",
            {
                "Network": {"receive_port": port, "receiver_processes": 1},
                "Directories": {
                    "destination_dir": tmp_path / "dest",
                    "min_free_space_mb": 0,
                    "folder_layout": layout,
                },
                "Security": {"trusted_ae_titles": "SCANNER"},
                # patients become the forwarder's top-level groups
                "AE_Mappings": {"SCANNER": watch},
                "Tools": {"enhanced_mr_conversion": "off"},
                "FolderWatcher": {
                    "watch_folder": watch,
                    "target_aet": TARGET_AET,
                    "target_ip": "127.0.0.1",
                    "target_port": target.port,
                    "inactivity_timeout": 1,
                    "process_timer_interval": 0.5,
                },
            },
        )
        node = start_node(["--config", str(cfg)], port=port)
        ids = ["failed", "FAILED", ".hidden", "x.part", "y.TMP", "..", "z.tmp."]
        files = [
            save(make_image("CT", patient_id=pid, patient_name=""), tmp_path / "src" / f"{i}.dcm")
            for i, pid in enumerate(ids)
        ]
        # something the forwarder will not send gets one line saying why
        watch.mkdir(parents=True, exist_ok=True)
        (watch / ".copy-in-progress.dcm").write_bytes(b"x")
        done = subprocess.run(
            [require_tool("storescu"), "-aet", "SCANNER", "127.0.0.1", str(port), *map(str, files)],
            env=peer_env(),
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert wait_until(lambda: len(target.order()) == len(files), 120), node.output()[-3000:]
        assert sorted(target.received_sops()) == sorted(
            str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
        )
        assert wait_until(lambda: "SKIPPED path=" in node.output(), 30)
        assert node.output().count("SKIPPED path=") == 1
        assert ".copy-in-progress.dcm reason=hidden file name" in node.output()
    finally:
        target.stop()

"""Generate the deterministic benchmark datasets under ``bench/data/``.

Every dataset is Explicit VR Little Endian, passes ``dcmdump`` and is rebuilt
only when its manifest (``<name>.json`` beside the folder) does not match the
requested parameters. The same parameters always give byte-identical files:
UIDs come from :func:`pydicom.uid.generate_uid` with fixed entropy sources and
pixel values from fixed formulas.

Datasets (full size; ``--quick`` shrinks the counts for the smoke test):

* ``ct512``: 300 CT images, 512x512 uint16, one patient / study / series.
* ``small``: 2000 CT images, 64x64 uint16, 10 patients, 20 studies of 100.
* ``rt``: RTSTRUCT + RTPLAN + RTDOSE from pydicom's bundled test files,
  retargeted to one patient, study and frame of reference, with new valid UIDs
  and the plan -> structure set and dose -> plan references fixed.
* ``big``: one RT Dose object of about 1 GB (32-bit multi-frame dose grid),
  written in chunks so generating it needs little memory.

Run ``python bench/make_data.py [--quick] [--data DIR] [NAME ...]``.
This module imports pydicom and numpy only; it never touches ``src/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

#: Bump when the content of a dataset changes, to force regeneration.
FORMAT_VERSION: Final = 1
#: Root of all generated UIDs (pydicom's registered prefix).
UID_PREFIX: Final = "1.2.826.0.1.3680043.8.498."
#: Where the datasets live by default (gitignored).
DEFAULT_DATA_DIR: Final = Path(__file__).resolve().parent / "data"

CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"
RT_DOSE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.481.2"
DICOM_ROOT: Final = "1.2.840.10008."


@dataclass(frozen=True, slots=True)
class DataSpec:
    """Parameters of one dataset; equal specs give identical files.

    Attributes
    ----------
    name : str
        Dataset name and folder name.
    files : int
        Number of objects.
    rows, columns : int
        Image size in pixels (``big``: size of one dose frame).
    patients, studies : int
        How many patients and studies the objects are spread over.
    big_bytes : int
        Target pixel data size of the ``big`` object in bytes (0 otherwise).
    """

    name: str
    files: int
    rows: int = 0
    columns: int = 0
    patients: int = 1
    studies: int = 1
    big_bytes: int = 0


FULL_SPECS: Final = {
    "ct512": DataSpec("ct512", 300, 512, 512),
    "small": DataSpec("small", 2000, 64, 64, patients=10, studies=20),
    "rt": DataSpec("rt", 3),
    "big": DataSpec("big", 1, 512, 512, big_bytes=1_000_000_000),
}
QUICK_SPECS: Final = {
    "ct512": DataSpec("ct512", 6, 512, 512),
    "small": DataSpec("small", 40, 64, 64, patients=2, studies=4),
    "rt": DataSpec("rt", 3),
    "big": DataSpec("big", 1, 512, 512, big_bytes=24_000_000),
}


def uid(*parts: object) -> str:
    """Return a deterministic valid UID derived from ``parts``."""
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts]))


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = uid("dicomnode-bench", "implementation")
    meta.ImplementationVersionName = "DNBENCH1"
    return meta


def _save(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a Part 10 file in Explicit VR Little Endian."""
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _patient_study(ds: Dataset, patient: int, study_key: str) -> None:
    ds.PatientName = f"BENCH^P{patient:02d}"
    ds.PatientID = f"BENCH{patient:02d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uid(study_key, "study")
    ds.StudyID = "1"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""


def _image_template(spec: DataSpec) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.Manufacturer = "dicomnode-bench"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.9765625, 0.9765625]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    return ds


def _phantom(rows: int, columns: int) -> np.ndarray:
    """Return a deterministic uint16 disc phantom of the given size."""
    y, x = np.mgrid[0:rows, 0:columns]
    r2 = (x - columns / 2) ** 2 + (y - rows / 2) ** 2
    inside = r2 < (0.45 * min(rows, columns)) ** 2
    img = np.where(inside, 1024 + (x + 2 * y) % 200, 0)
    return img.astype("<u2")


def make_images(spec: DataSpec, folder: Path) -> None:
    """Write ``spec.files`` CT images spread evenly over patients and studies."""
    template = _image_template(spec)
    base = _phantom(spec.rows, spec.columns)
    per_study = max(1, spec.files // spec.studies)
    studies_per_patient = max(1, spec.studies // spec.patients)
    for index in range(spec.files):
        study = min(index // per_study, spec.studies - 1)
        patient = min(study // studies_per_patient, spec.patients - 1)
        slice_no = index - study * per_study
        study_key = f"{spec.name}-{study}"
        ds = template.copy()
        _patient_study(ds, patient, study_key)
        ds.SeriesInstanceUID = uid(study_key, "series")
        ds.FrameOfReferenceUID = uid(study_key, "frame")
        ds.SOPInstanceUID = uid(spec.name, index, "instance")
        ds.InstanceNumber = slice_no + 1
        ds.ImagePositionPatient = [-250.0, -250.0, float(slice_no)]
        ds.SliceLocation = float(slice_no)
        ds.PixelData = (base + np.uint16(slice_no % 100)).tobytes()
        _save(ds, folder / f"P{patient:02d}" / f"S{study:02d}" / f"IMG{index:05d}.dcm")


def _remap_uids(ds: Dataset, mapping: dict[str, str], key: str) -> None:
    """Replace every instance-level UID in ``ds`` (recursively) by a stable new one."""
    for elem in ds.iterall():
        if elem.VR != "UI" or elem.value in (None, ""):
            continue
        if elem.tag in (0x00080016, 0x00081150, 0x00020010):  # SOP class references
            continue
        values = elem.value if elem.VM > 1 else [elem.value]
        new = []
        for value in values:
            text = str(value)
            if text.startswith(DICOM_ROOT):
                new.append(text)
                continue
            new.append(mapping.setdefault(text, uid(key, "remap", text)))
        elem.value = new if elem.VM > 1 else new[0]


def make_rt(spec: DataSpec, folder: Path) -> None:
    """Write RTSTRUCT, RTPLAN and RTDOSE retargeted to one patient and study."""
    with warnings.catch_warnings():  # the bundled files carry a few invalid UIDs
        warnings.simplefilter("ignore")
        _make_rt(folder)


def _make_rt(folder: Path) -> None:
    names = ("rtstruct.dcm", "rtplan.dcm", "rtdose.dcm")
    sets = [dcmread(str(get_testdata_file(n)), force=True) for n in names]
    study_uid = uid("rt", "study")
    frame_uid = uid("rt", "frame")
    mapping: dict[str, str] = {}
    for ds in sets:
        mapping[str(ds.StudyInstanceUID)] = study_uid
        if "FrameOfReferenceUID" in ds:
            mapping[str(ds.FrameOfReferenceUID)] = frame_uid
    for ref in sets[0].get("ReferencedFrameOfReferenceSequence", []):
        mapping[str(ref.FrameOfReferenceUID)] = frame_uid
    for ds in sets:
        _remap_uids(ds, mapping, "rt")
        ds.remove_private_tags()
        _patient_study(ds, 0, "rt")
        ds.StudyInstanceUID = study_uid
        if "FrameOfReferenceUID" in ds or ds.Modality == "RTDOSE":
            ds.FrameOfReferenceUID = frame_uid
    struct_ds, plan, dose = sets
    plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = struct_ds.SOPInstanceUID
    if "ReferencedRTPlanSequence" in dose:
        dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = plan.SOPInstanceUID
    for index, ds in enumerate(sets):
        _save(ds, folder / "P00" / f"{ds.Modality}_{index}.dcm")


def _dose_header(spec: DataSpec, frames: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = RT_DOSE_STORAGE
    ds.SOPInstanceUID = uid("big", spec.big_bytes, "instance")
    ds.Modality = "RTDOSE"
    ds.Manufacturer = "dicomnode-bench"
    _patient_study(ds, 0, "big")
    ds.SeriesInstanceUID = uid("big", "series")
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = uid("big", "frame")
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-250.0, -250.0, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x3004000C
    ds.GridFrameOffsetVector = [float(i) for i in range(frames)]
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = 1e-6
    return ds


def make_big(spec: DataSpec, folder: Path) -> None:
    """Write one multi-frame RT Dose of about ``spec.big_bytes`` pixel bytes, in chunks."""
    frame_bytes = spec.rows * spec.columns * 4
    frames = max(1, -(-spec.big_bytes // frame_bytes))
    ds = _dose_header(spec, frames)
    path = folder / "P00" / "RTDOSE_big.dcm"
    _save(ds, path)
    base = _phantom(spec.rows, spec.columns).astype("<u4") * 1000
    with path.open("ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        for frame in range(frames):
            fh.write((base + np.uint32(frame)).tobytes())


MAKERS: Final[dict[str, Callable[[DataSpec, Path], None]]] = {
    "ct512": make_images,
    "small": make_images,
    "rt": make_rt,
    "big": make_big,
}


def _manifest(spec: DataSpec) -> dict[str, object]:
    return {"format_version": FORMAT_VERSION, **asdict(spec)}


def dataset_files(folder: Path) -> list[Path]:
    """Return the DICOM files of a generated dataset folder, sorted."""
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file())


def ensure_dataset(spec: DataSpec, data_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Generate ``spec`` under ``data_dir`` unless an identical one exists; return its folder."""
    folder = data_dir / spec.name
    manifest_path = data_dir / f"{spec.name}.json"
    wanted = _manifest(spec)
    if manifest_path.exists() and folder.is_dir():
        try:
            if json.loads(manifest_path.read_text()) == wanted:
                return folder
        except ValueError:
            pass
    log(f"generating dataset {spec.name} in {folder} ...")
    manifest_path.unlink(missing_ok=True)
    building = data_dir / f".{spec.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    MAKERS[spec.name](spec, building)
    found = len(dataset_files(building))
    if found != spec.files:
        raise RuntimeError(f"{spec.name}: generated {found} files, expected {spec.files}")
    shutil.rmtree(folder, ignore_errors=True)
    building.rename(folder)
    manifest_path.write_text(json.dumps(wanted, indent=2) + "\n")
    return folder


def specs_for(quick: bool) -> dict[str, DataSpec]:
    """Return the dataset parameters of a full or a quick run."""
    return dict(QUICK_SPECS if quick else FULL_SPECS)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the named datasets (all by default)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"datasets: {', '.join(FULL_SPECS)} (all)")
    parser.add_argument("--quick", action="store_true", help="tiny datasets for the smoke test")
    parser.add_argument("--data", type=Path, default=None, help="data folder (bench/data)")
    args = parser.parse_args(argv)
    specs = specs_for(args.quick)
    data_dir = args.data or (DEFAULT_DATA_DIR / "quick" if args.quick else DEFAULT_DATA_DIR)
    unknown = set(args.names) - set(specs)
    if unknown:
        parser.error(f"unknown dataset(s): {', '.join(sorted(unknown))}")
    for name in args.names or list(specs):
        folder = ensure_dataset(specs[name], data_dir)
        files = dataset_files(folder)
        total = sum(p.stat().st_size for p in files)
        print(f"{name}: {len(files)} files, {total / 1e6:.1f} MB in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

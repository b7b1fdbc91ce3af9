"""Synthetic DICOM objects built in code (no patient data, no binaries in git)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

ROOT = "1.2.826.0.1.3680043.8.498."


def make_image(
    modality: str = "CT",
    rows: int = 16,
    cols: int = 16,
    patient_id: str = "PAT001",
    patient_name: str = "TEST^PATIENT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance: int = 1,
    sop_uid: str | None = None,
) -> Dataset:
    """Return a small single-frame CT or MR image data set with file meta."""
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid(ROOT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyInstanceUID = study_uid or generate_uid(ROOT)
    ds.SeriesInstanceUID = series_uid or generate_uid(ROOT)
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.StudyDescription = "Synthetic study"
    ds.SeriesDescription = f"Synthetic {modality}"
    ds.FrameOfReferenceUID = ROOT + "1"
    ds.ImagePositionPatient = [0.0, 0.0, float(instance)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    arr = (np.arange(rows * cols, dtype=np.uint16) + instance).reshape(rows, cols)
    ds.PixelData = arr.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` in DICOM file format and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def bundled(name: str) -> Path:
    """Return the path of one of pydicom's bundled test files (e.g. 'rtplan.dcm')."""
    found = get_testdata_file(name)
    if found is None:
        raise FileNotFoundError(name)
    return Path(str(found))


def rt_set(
    patient_id: str = "PAT001", study_uid: str | None = None, image_series: str | None = None
) -> dict[str, Dataset]:
    """Return RTSTRUCT, RTPLAN and RTDOSE data sets from pydicom's examples, re-keyed to one study.

    They reference each other as an export from a planning system does: the dose its
    plan, the plan its structure set. The structure set references ``image_series``
    (RT Referenced Series of its Referenced Frame of Reference) or, when None, no
    image series at all (the sequence is Type 3), so the set is complete on its own.
    """
    study_uid = study_uid or generate_uid(ROOT)
    out: dict[str, Dataset] = {}
    for name in ("rtstruct", "rtplan", "rtdose"):
        obj = dcmread(bundled(f"{name}.dcm"), force=True)
        if "TransferSyntaxUID" not in obj.file_meta:
            obj.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"  # implicit VR little endian
            obj.file_meta.MediaStorageSOPClassUID = obj.SOPClassUID
        obj.PatientID = patient_id
        obj.StudyInstanceUID = study_uid
        obj.SOPInstanceUID = generate_uid(ROOT)
        obj.file_meta.MediaStorageSOPInstanceUID = obj.SOPInstanceUID
        out[name] = obj
    struct, plan, dose = out["rtstruct"], out["rtplan"], out["rtdose"]
    plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = struct.SOPInstanceUID
    del plan.ReferencedRTPlanSequence  # the example's "related plan" is not part of the set
    dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = plan.SOPInstanceUID
    if image_series is None:
        del struct.ReferencedFrameOfReferenceSequence
    else:
        study = struct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
        study.ReferencedSOPInstanceUID = study_uid
        study.RTReferencedSeriesSequence[0].SeriesInstanceUID = image_series
    return out

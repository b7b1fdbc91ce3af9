"""Pure storage policy: where, below its AE folder, a received object is filed.

``relative_path(header, layout)`` turns a header into ``<patient>/<study>/<series>/<file>``
(or another configured layout). Names are readable *and* collision-free: study
and series folders carry a short hash of their UID, files are named by SOP
Instance UID. Nothing here touches the disk. Imports pydicom types and
:mod:`dicomnode.dicomtags`.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from pydicom.dataset import Dataset

from dicomnode.dicomtags import safe_component, short_hash, text_of


def layout_fields(header: Dataset) -> dict[str, str]:
    """Return the safe folder-name fields of ``header`` (see README "Folder layout").

    ``patient``  ``<PatientID>_<PatientName>``;
    ``study``    ``<StudyDate>_<StudyDescription>_<hash of StudyInstanceUID>``;
    ``series``   ``<Modality>_<SeriesNumber>_<SeriesDescription>_<hash of SeriesInstanceUID>``;
    plus ``patient_id``, ``modality``, ``study_date``, ``series_number`` alone.
    """
    patient_id = text_of(header, "PatientID")
    patient_name = text_of(header, "PatientName")
    modality = text_of(header, "Modality") or "OT"
    study_uid = text_of(header, "StudyInstanceUID")
    series_uid = text_of(header, "SeriesInstanceUID")
    study_date = text_of(header, "StudyDate")
    series_number = text_of(header, "SeriesNumber")
    patient = "_".join(p for p in (patient_id or "NOID", patient_name) if p)
    study = "_".join(
        p
        for p in (
            study_date or "NODATE",
            text_of(header, "StudyDescription")[:40],
            short_hash(study_uid or "no-study-uid"),
        )
        if p
    )
    series = "_".join(
        p
        for p in (
            modality,
            series_number,
            text_of(header, "SeriesDescription")[:40],
            short_hash(series_uid or "no-series-uid"),
        )
        if p
    )
    return {
        "patient": safe_component(patient, "NOID"),
        "study": safe_component(study, "NOSTUDY"),
        "series": safe_component(series, "NOSERIES"),
        "patient_id": safe_component(patient_id, "NOID"),
        "modality": safe_component(modality, "OT"),
        "study_date": safe_component(study_date, "NODATE"),
        "series_number": safe_component(series_number, "0"),
    }


def relative_dir(header: Dataset, layout: str) -> PurePosixPath:
    """Return the folder of ``header`` below its AE folder, following ``layout``.

    Each ``/``-separated part of the layout is formatted and sanitised on its
    own, so no value can add or climb folder levels.
    """
    values = layout_fields(header)
    parts = [
        safe_component(part.format(**values), "UNKNOWN")
        for part in layout.replace("\\", "/").split("/")
        if part.strip()
    ]
    return PurePosixPath(*parts)


def file_name(header: Dataset) -> str:
    """Return the file name of an object: ``<Modality>_<SOPInstanceUID>.dcm``.

    Unique per SOP Instance UID; a re-sent instance maps to the same name.
    """
    return instance_file_name(modality_prefix(header), text_of(header, "SOPInstanceUID"))


def modality_prefix(header: Dataset) -> str:
    """Return the first part of a file name: the sanitised Modality (``OT`` when absent)."""
    return safe_component(text_of(header, "Modality") or "OT", "OT", 16)


def instance_file_name(prefix: str, sop_instance_uid: str) -> str:
    """Return ``<prefix>_<SOPInstanceUID>.dcm`` with the UID sanitised."""
    return f"{prefix}_{safe_component(sop_instance_uid, 'NOUID', 64)}.dcm"


def relative_path(header: Dataset, layout: str) -> PurePosixPath:
    """Return ``relative_dir(header, layout) / file_name(header)``."""
    return relative_dir(header, layout) / file_name(header)

"""Pure storage policy: where, below its AE folder, a received object is filed.

``folder_plan(header, layout)`` turns a header into the folder levels
``<patient>/<study>/<series>`` (or another configured layout) and
``file_name(header)`` names the file. Folder names are readable *and* decided by
identity: each level ends with a tag, a short hash of the PatientID,
StudyInstanceUID or SeriesInstanceUID it stands for, so an existing folder with
that tag is the one to use whatever descriptive text the first object gave it
(:class:`dicomnode.storage.FolderResolver` finds or creates it). Files are named
by SOP Instance UID. Nothing here touches the disk. Imports pydicom types and
:mod:`dicomnode.dicomtags`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

from pydicom.dataset import Dataset

from dicomnode.dicomtags import MAX_COMPONENT, safe_component, text_of

#: Which entity each layout field describes (patient < study < series).
_PATIENT, _STUDY, _SERIES = 1, 2, 3
_FIELD_LEVEL: Final = {
    "patient": _PATIENT,
    "patient_id": _PATIENT,
    "study": _STUDY,
    "study_date": _STUDY,
    "series": _SERIES,
    "modality": _SERIES,
    "series_number": _SERIES,
}
#: Fields whose value is the identity itself: a part made only of these needs no tag.
_IDENTITY_FIELDS: Final = frozenset({"patient_id"})
#: Hex digits of the identity tag: patient folders share their parent with every other
#: patient (a longer tag), study and series folders only with their siblings.
_TAG_DIGITS: Final = {_PATIENT: 12, _STUDY: 8, _SERIES: 8}
_FIELD: Final = re.compile(r"{([^{}]*)}")


@dataclass(frozen=True, slots=True)
class FolderLevel:
    """One folder level of an object's path, as the first object of its identity names it.

    Attributes
    ----------
    name : str
        The safe folder name this object would give the folder. When ``tag`` is
        set the name ends with ``_<tag>``.
    tag : str or None
        The identity tag: a hash of the PatientID, StudyInstanceUID or
        SeriesInstanceUID the level stands for. An existing folder of the same
        parent whose name ends with ``_<tag>`` *is* this level, whatever the rest
        of its name says. None: the name alone identifies the folder.
    """

    name: str
    tag: str | None


def patient_identity(header: Dataset) -> str:
    """Return what identifies a patient: the PatientID, or the PatientName when it has none."""
    patient_id = text_of(header, "PatientID")
    return patient_id if patient_id else "\x00name:" + text_of(header, "PatientName")


def identity_tag(values: tuple[str, ...], digits: int) -> str:
    """Return ``digits`` hex of SHA-1 of the identity values (UTF-8; one UID alone: of the UID)."""
    text = "\x00".join(values)
    return hashlib.sha1(text.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()[
        :digits
    ]


def layout_fields(header: Dataset) -> dict[str, str]:
    """Return the safe folder-name fields of ``header`` (see README "Folder layout").

    ``patient``  ``<PatientID>_<PatientName>``;
    ``study``    ``<StudyDate>_<StudyDescription>``;
    ``series``   ``<Modality>_<SeriesNumber>_<SeriesDescription>``;
    plus ``patient_id``, ``modality``, ``study_date``, ``series_number`` alone.
    The identity tag is added per folder level by :func:`folder_plan`.
    """
    patient_id = text_of(header, "PatientID")
    patient_name = text_of(header, "PatientName")
    modality = text_of(header, "Modality") or "OT"
    study_date = text_of(header, "StudyDate")
    series_number = text_of(header, "SeriesNumber")
    patient = "_".join(p for p in (patient_id or "NOID", patient_name) if p)
    study = "_".join(
        p for p in (study_date or "NODATE", text_of(header, "StudyDescription")[:40]) if p
    )
    series = "_".join(
        p for p in (modality, series_number, text_of(header, "SeriesDescription")[:40]) if p
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


def _identities(header: Dataset) -> dict[int, str]:
    return {
        _PATIENT: patient_identity(header),
        _STUDY: text_of(header, "StudyInstanceUID") or "no-study-uid",
        _SERIES: text_of(header, "SeriesInstanceUID") or "no-series-uid",
    }


def folder_plan(header: Dataset, layout: str) -> tuple[FolderLevel, ...]:
    """Return the folder levels of ``header`` below its AE folder, following ``layout``.

    Each ``/``-separated part of the layout is formatted and sanitised on its own,
    so no value can add or climb folder levels. A part is bound to the deepest
    entity whose fields it uses (``{patient}``, ``{patient_id}``: the patient;
    ``{study}``, ``{study_date}``: the study; ``{series}``, ``{modality}``,
    ``{series_number}``: the series) and gets the tag of that entity's identity
    (PatientID, StudyInstanceUID, SeriesInstanceUID), so every object of one
    identity finds the folder the first one named. A part made only of
    ``{patient_id}`` (and text) is its identity already and gets no tag.
    """
    values = layout_fields(header)
    identities: dict[int, str] | None = None
    levels: list[FolderLevel] = []
    for part in layout.replace("\\", "/").split("/"):
        if not part.strip():
            continue
        fields = set(_FIELD.findall(part))
        level = max((_FIELD_LEVEL.get(f, 0) for f in fields), default=0)
        if not level or fields <= _IDENTITY_FIELDS:
            levels.append(FolderLevel(safe_component(part.format(**values), "UNKNOWN"), None))
            continue
        if identities is None:
            identities = _identities(header)
        digits = _TAG_DIGITS[level]
        tag = identity_tag((identities[level],), digits)
        text = safe_component(part.format(**values), "UNKNOWN", MAX_COMPONENT - digits - 1)
        levels.append(FolderLevel(f"{text}_{tag}", tag))
    return tuple(levels)


def relative_dir(header: Dataset, layout: str) -> PurePosixPath:
    """Return the folder ``header`` would get below its AE folder as the first of its identities.

    The receiver files an object into the folders that already stand for its
    patient, study and series (:func:`folder_plan` tags), which may carry the
    names an earlier object gave them.
    """
    return PurePosixPath(*(level.name for level in folder_plan(header, layout)))


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

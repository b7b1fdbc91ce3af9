"""Header reading of the forwarder: the facts of one file needed to send it, or why it cannot be.

:func:`inspect_file` reads a file's header in **one pass**
(:func:`dicomnode.integrity.examine`: File Meta Information, the structural
walk of every element header, and the raw values of :data:`FORWARD_TAGS`,
typically one ``pread`` for a small object; pixel data is never read) and
returns an :class:`~.batching.ObjectInfo` (SOP Class/Instance UID of the data
set, transfer syntax, order keys, the offset of the data set in the file, so
the SCU reads nothing twice) or a :class:`~.outcome.ParkReason`. The values
are decoded from their raw bytes without building a pydicom data set; code
that needs more of the header (e.g. sequences) adds its tags to the same walk
and decodes them with :func:`header_dataset`. Data sets without File Meta
Information (as DCMTK's storescu sends them) are accepted when their UIDs
read as UIDs (read by pydicom: the rare, slow path). The RT references
(:mod:`.completeness`) come from the same walk: the reference sequences are
collected raw and decoded by pydicom only for RT objects. Reads files; never
writes, moves or sends. Log verbs: ``UID-MISMATCH`` (once per version of a file, however often a
waiting group is looked at again), ``REFERENCES-UNREADABLE``.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final

from dicomnode.dul.meta import EXPLICIT_VR_BE, EXPLICIT_VR_LE, IMPLICIT_VR_LE, has_preamble
from dicomnode.dul.pdu import uid_text
from dicomnode.forwarder.batching import (
    ObjectInfo,
    object_category,
)
from dicomnode.forwarder.completeness import (
    MAX_EVIDENCE_IMAGES,
    MAX_REFERENCES,
    REFERENCE_KEYWORDS,
    RTPLAN,
    RTSTRUCT,
    SERIES,
    Reference,
    references_of,
)
from dicomnode.forwarder.job import JobFile
from dicomnode.forwarder.outcome import ParkReason
from dicomnode.integrity import Examination, examine, sequence_items
from dicomnode.logsafe import escape

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)


class _OncePerFile:
    """Remember which file versions were warned about, so a waiting group's rescans stay quiet.

    A file is one version per (path, size, mtime); at most ``limit`` are kept
    (the oldest forgotten first). Thread-safe: forwarder workers share it.
    """

    def __init__(self, limit: int = 10000) -> None:
        self._seen: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def first(self, jf: JobFile) -> bool:
        """Return True the first time ``jf`` (this version of the file) is asked about."""
        key = (str(jf.path), jf.size, jf.mtime_ns)
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > self._limit:
                self._seen.popitem(last=False)
            return True


_UID_MISMATCH_WARNED: Final = _OncePerFile()

SOP_CLASS_UID: Final = 0x00080016
SOP_INSTANCE_UID: Final = 0x00080018
MODALITY: Final = 0x00080060
SERIES_NUMBER: Final = 0x00200011
INSTANCE_NUMBER: Final = 0x00200013
STUDY_INSTANCE_UID: Final = 0x0020000D
SERIES_INSTANCE_UID: Final = 0x0020000E
#: The sequences :func:`~.completeness.references_of` reads (:data:`REFERENCE_KEYWORDS`).
REFERENCE_TAGS: Final = frozenset(
    {
        0x300C0002,  # ReferencedRTPlanSequence
        0x300C0060,  # ReferencedStructureSetSequence
        0x30060010,  # ReferencedFrameOfReferenceSequence
    }
)
#: Send order classes whose references are checked before sending.
_RT_CATEGORIES: Final = frozenset({"RTDOSE", "RTRECORD", "RTPLAN", "RTSTRUCT"})
#: File Meta elements (group 0002) compared with the data set's own UIDs.
_MEDIA_SOP_CLASS: Final = 0x0002
_MEDIA_SOP_INSTANCE: Final = 0x0003
#: Top-level tags whose raw values the forwarder's one header walk collects.
FORWARD_TAGS: Final = frozenset(
    {
        SOP_CLASS_UID,
        SOP_INSTANCE_UID,
        MODALITY,
        SERIES_NUMBER,
        INSTANCE_NUMBER,
        STUDY_INSTANCE_UID,
        SERIES_INSTANCE_UID,
        *REFERENCE_TAGS,
    }
)


def _int_or_none(value: str) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def raw_text(exam: Examination, tag: int) -> str:
    """Return the value of ``tag`` from one header walk as text (ASCII VRs: UI, CS, IS), or ""."""
    found = exam.elements.get(tag)
    if found is None:
        return ""
    return found[1].decode("latin-1").strip("\0").strip()


def header_dataset(exam: Examination) -> Dataset:
    """Return the collected elements of ``exam`` as a pydicom data set (decoded on access)."""
    from dicomnode.dicomtags import header_from_elements

    return header_from_elements(exam.elements, exam.implicit, exam.little)


def inspect_file(jf: JobFile, key: PurePosixPath) -> ObjectInfo | ParkReason:
    """Read the header facts of one file in one pass, or say why it cannot be sent.

    Parameters
    ----------
    jf : JobFile
        The file.
    key : PurePosixPath
        Identifier stored as ``ObjectInfo.rel_path``.

    Returns
    -------
    ObjectInfo or ParkReason
        ParkReason for empty, unreadable, non-DICOM and structurally incomplete
        files and for objects without (valid) SOP Class / SOP Instance UID.
    """
    if jf.size == 0:
        return ParkReason(None, "empty file (0 bytes)")
    try:
        exam = examine(jf.path, FORWARD_TAGS)
    except OSError as exc:
        return ParkReason(None, f"unreadable: {exc.strerror or exc}")
    if exam.data_start < 0:
        return _inspect_without_meta(jf, key, exam)
    meta_class = uid_text(exam.meta.get(_MEDIA_SOP_CLASS, b""))
    meta_uid = uid_text(exam.meta.get(_MEDIA_SOP_INSTANCE, b""))
    # The C-STORE carries the data set's own UIDs; the File Meta header may disagree.
    sop_class = raw_text(exam, SOP_CLASS_UID) or meta_class
    sop_uid = raw_text(exam, SOP_INSTANCE_UID) or meta_uid
    ts = exam.syntax or syntax_of_encoding((exam.implicit, exam.little))
    if exam.defect is not None:
        return ParkReason(
            None, f"truncated or malformed DICOM file: {exam.defect}", escaped(sop_uid)
        )
    checked = _check_uids(jf, sop_class, sop_uid, meta_class, meta_uid)
    if checked is not None:
        return checked
    modality = raw_text(exam, MODALITY)
    references: tuple[Reference, ...] = ()
    if object_category(modality, sop_class) in _RT_CATEGORIES and any(
        tag in exam.elements for tag in REFERENCE_TAGS
    ):
        references = raw_references(exam, modality, sop_class, jf.display)
    return ObjectInfo(
        rel_path=key,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        transfer_syntax_uid=ts,
        modality=modality,
        series_number=_int_or_none(raw_text(exam, SERIES_NUMBER)),
        instance_number=_int_or_none(raw_text(exam, INSTANCE_NUMBER)),
        series_instance_uid=raw_text(exam, SERIES_INSTANCE_UID),
        study_instance_uid=raw_text(exam, STUDY_INSTANCE_UID),
        references=references,
        data_start=exam.data_start,
    )


_REFERENCED_SOP_INSTANCE_UID: Final = 0x00081155
_RT_REFERENCED_STUDY_SEQUENCE: Final = 0x30060012
_RT_REFERENCED_SERIES_SEQUENCE: Final = 0x30060014
_CONTOUR_IMAGE_SEQUENCE: Final = 0x30060016


def raw_references(
    exam: Examination, modality: str, sop_class: str, display: str
) -> tuple[Reference, ...]:
    """Return the RT references from the raw sequences of one header walk, no pydicom.

    The same references, in the same order, as :func:`~.completeness.references_of`
    on the pydicom data set (the unit tests compare the two). Malformed sequences:
    a ``REFERENCES-UNREADABLE`` line and no references, as :func:`rt_references`.
    """
    implicit, little = exam.implicit, exam.little

    def items(
        fields: dict[int, tuple[bytes, bytes]], tag: int, wanted: frozenset[int]
    ) -> list[dict[int, tuple[bytes, bytes]]]:
        found = fields.get(tag)
        return sequence_items(found[1], implicit, little, wanted) if found else []

    def text(fields: dict[int, tuple[bytes, bytes]], tag: int) -> str:
        found = fields.get(tag)
        return found[1].decode("ascii", "replace").strip().rstrip("\x00").strip() if found else ""

    referenced = frozenset({_REFERENCED_SOP_INSTANCE_UID})
    category = object_category(modality, sop_class)
    refs: list[Reference] = []
    try:
        if category in ("RTDOSE", "RTRECORD"):
            for item in items(exam.elements, 0x300C0002, referenced):
                refs.append(Reference(RTPLAN, text(item, _REFERENCED_SOP_INSTANCE_UID)))
        elif category == "RTPLAN":
            for item in items(exam.elements, 0x300C0060, referenced):
                refs.append(Reference(RTSTRUCT, text(item, _REFERENCED_SOP_INSTANCE_UID)))
        elif category == "RTSTRUCT":
            own_study = text(exam.elements, STUDY_INSTANCE_UID)
            studies = frozenset({_RT_REFERENCED_STUDY_SEQUENCE})
            study_fields = frozenset({_REFERENCED_SOP_INSTANCE_UID, _RT_REFERENCED_SERIES_SEQUENCE})
            series_fields = frozenset({SERIES_INSTANCE_UID, _CONTOUR_IMAGE_SEQUENCE})
            for frame in items(exam.elements, 0x30060010, studies):
                for study in items(frame, _RT_REFERENCED_STUDY_SEQUENCE, study_fields):
                    study_uid = text(study, _REFERENCED_SOP_INSTANCE_UID) or own_study
                    for series in items(study, _RT_REFERENCED_SERIES_SEQUENCE, series_fields):
                        series_uid = text(series, SERIES_INSTANCE_UID)
                        if not series_uid:
                            continue
                        images = [
                            uid
                            for image in items(series, _CONTOUR_IMAGE_SEQUENCE, referenced)
                            if (uid := text(image, _REFERENCED_SOP_INSTANCE_UID))
                        ]
                        refs.append(
                            Reference(
                                SERIES, series_uid, study_uid, tuple(images[:MAX_EVIDENCE_IMAGES])
                            )
                        )
    except ValueError as exc:
        return _unreadable_references(display, exc)
    return tuple(dict.fromkeys(r for r in refs if r.uid))[:MAX_REFERENCES]


def rt_references(
    ds: Dataset, modality: str, sop_class: str, display: str
) -> tuple[Reference, ...]:
    """Return an object's RT references (:func:`~.completeness.references_of`), none if unreadable.

    A malformed reference sequence does not stop the object: it is sent as any
    other object, after a ``REFERENCES-UNREADABLE`` line.
    """
    try:
        return references_of(ds, modality, sop_class)
    except Exception as exc:  # pydicom raises many types on a malformed sequence
        return _unreadable_references(display, exc)


def _unreadable_references(display: str, exc: Exception) -> tuple[Reference, ...]:
    """Log ``REFERENCES-UNREADABLE`` for a file and return no references."""
    logger.warning(
        "REFERENCES-UNREADABLE file=%s: %s: %s; its RT references are not checked",
        escaped(display),
        type(exc).__name__,
        escaped(str(exc)),
    )
    return ()


def _check_uids(
    jf: JobFile, sop_class: str, sop_uid: str, meta_class: str, meta_uid: str
) -> ParkReason | None:
    """Return why the UIDs cannot be sent, or None (logging a File Meta disagreement)."""
    if not sop_class or not sop_uid:
        return ParkReason(
            None, "DICOM file without SOP Class UID or SOP Instance UID", escaped(sop_uid)
        )
    for name, uid in (("SOP Class UID", sop_class), ("SOP Instance UID", sop_uid)):
        if not is_sendable_uid(uid):
            return ParkReason(None, f"invalid {name} {escaped(uid)!r}", escaped(sop_uid))
    mismatch = (meta_class and meta_class != sop_class) or (meta_uid and meta_uid != sop_uid)
    if mismatch and _UID_MISMATCH_WARNED.first(jf):
        logger.warning(
            "UID-MISMATCH file=%s: File Meta says sop_class_uid=%s sop_instance_uid=%s, "
            "the data set says sop_class_uid=%s sop_instance_uid=%s; the data set's are sent",
            escaped(jf.display),
            escaped(meta_class),
            escaped(meta_uid),
            sop_class,
            sop_uid,
        )
    return None


def _inspect_without_meta(
    jf: JobFile, key: PurePosixPath, exam: Examination
) -> ObjectInfo | ParkReason:
    """Inspect a file whose File Meta Information could not be read: a bare data set, or not DICOM."""
    from dicomnode.dicomtags import text_of

    try:
        with jf.path.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        return ParkReason(None, f"unreadable: {exc.strerror or exc}")
    if has_preamble(head):
        return ParkReason(None, f"not a readable DICOM file: {exam.defect}")
    try:
        ds = read_bare_header(jf.path)
    except OSError as exc:
        return ParkReason(None, f"unreadable: {exc.strerror or exc}")
    if ds is None:
        return ParkReason(None, "not a DICOM file: no DICOM preamble, File Meta or data set")
    sop_class, sop_uid = text_of(ds, "SOPClassUID"), text_of(ds, "SOPInstanceUID")
    ts = syntax_of_encoding(ds.original_encoding)
    checked = _check_uids(jf, sop_class, sop_uid, "", "")
    if checked is not None:
        return checked
    defect = bare_data_set_defect(jf.path, ts)
    if defect is not None:
        return ParkReason(None, f"truncated or malformed DICOM file: {defect}", sop_uid)
    modality = text_of(ds, "Modality")
    return ObjectInfo(
        rel_path=key,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        transfer_syntax_uid=ts,
        modality=modality,
        series_number=_int_or_none(text_of(ds, "SeriesNumber")),
        instance_number=_int_or_none(text_of(ds, "InstanceNumber")),
        series_instance_uid=text_of(ds, "SeriesInstanceUID"),
        study_instance_uid=text_of(ds, "StudyInstanceUID"),
        references=rt_references(ds, modality, sop_class, jf.display),
        data_start=0,
    )


def syntax_of_encoding(encoding: tuple[bool | None, bool | None]) -> str:
    """Return the uncompressed transfer syntax of pydicom's ``(implicit VR, little endian)``."""
    implicit, little = encoding
    if implicit is not False:
        return IMPLICIT_VR_LE
    return EXPLICIT_VR_LE if little is not False else EXPLICIT_VR_BE


def read_bare_header(path: Path) -> Dataset | None:
    """Read the header of a data set stored without File Meta Information, or None.

    DCMTK's storescu sends such files (e.g. pydicom's ``rtstruct.dcm``); they count
    as DICOM only when their SOP Class and SOP Instance UIDs read as UIDs.
    """
    from pydicom import dcmread

    from dicomnode.dicomtags import HEADER_TAGS, text_of

    try:
        ds = dcmread(
            path,
            force=True,
            stop_before_pixels=True,
            specific_tags=[*HEADER_TAGS, *REFERENCE_KEYWORDS],
        )
    except Exception:  # anything that is not a data set
        return None
    sop_class, sop_uid = text_of(ds, "SOPClassUID"), text_of(ds, "SOPInstanceUID")
    if not (is_sendable_uid(sop_class) and is_sendable_uid(sop_uid)):
        return None
    return ds


def bare_data_set_defect(path: Path, syntax: str) -> str | None:
    """Return the structural defect of a data set without File Meta Information, or None."""
    uid = syntax.encode("ascii")
    if len(uid) % 2:
        uid += b"\0"
    meta = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(uid)) + uid
    return examine(b"\0" * 128 + b"DICM" + meta + path.read_bytes()).defect


def escaped(text: str) -> str:
    """Return ``text`` safe for one log line: :func:`dicomnode.logsafe.escape` (the one rule)."""
    return escape(text)


def is_sendable_uid(uid: str) -> bool:
    """Return True for a UID a C-STORE command can carry: printable ASCII without spaces.

    Deliberately lenient (like DCMTK's storescu): a UID that breaks the letter of
    PS3.5 9.1 (a letter, a leading zero, 65 characters) is the target's to judge.
    """
    return uid.isascii() and uid.isprintable() and " " not in uid and "\\" not in uid and bool(uid)

"""Header reading of the forwarder: the facts of one file needed to send it, or why it cannot be.

:func:`inspect_file` reads a file's header once (pydicom, pixel data skipped),
checks it is structurally whole (:mod:`dicomnode.integrity`) and returns an
:class:`~.batching.ObjectInfo` (SOP Class/Instance UID of the data set,
transfer syntax, order keys) or a :class:`~.outcome.ParkReason`. Data sets
without File Meta Information (as DCMTK's storescu sends them) are accepted
when their UIDs read as UIDs. Reads files; never writes, moves or sends.
Also collects the RT references
(:mod:`.completeness`) from the same read. Log verbs: ``UID-MISMATCH``,
``REFERENCES-UNREADABLE``.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path, PurePosixPath
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian

from dicomnode.dicomtags import HEADER_TAGS, text_of
from dicomnode.forwarder.batching import EXPLICIT_VR_LE, IMPLICIT_VR_LE, ObjectInfo
from dicomnode.forwarder.completeness import REFERENCE_KEYWORDS, Reference, references_of
from dicomnode.forwarder.job import JobFile
from dicomnode.forwarder.outcome import ParkReason
from dicomnode.integrity import examine, find_defect, read_header_bounded
from dicomnode.logsafe import escape

logger = logging.getLogger(__name__)

#: Elements the forwarder reads of each file: the usual header and the RT references.
FORWARD_TAGS: Final = (*HEADER_TAGS, *REFERENCE_KEYWORDS)


def _int_or_none(value: str) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def inspect_file(jf: JobFile, key: PurePosixPath) -> ObjectInfo | ParkReason:
    """Read the header facts of one file, or say why it cannot be sent.

    Parameters
    ----------
    jf : JobFile
        The file.
    key : PurePosixPath
        Identifier stored as ``ObjectInfo.rel_path``.

    Returns
    -------
    ObjectInfo or ParkReason
        ParkReason for empty, unreadable and non-DICOM files and for objects
        without SOP Class / SOP Instance UID.
    """
    if jf.size == 0:
        return ParkReason(None, "empty file (0 bytes)")
    bare = False
    try:
        ds = read_header_bounded(
            jf.path, FORWARD_TAGS
        )  # a deflated data set is never inflated whole
    except (InvalidDicomError, EOFError) as exc:
        found = read_bare_header(jf.path)
        if found is None:
            return ParkReason(None, f"not a DICOM file: {exc}")
        ds, bare = found, True
    except OSError as exc:
        return ParkReason(None, f"unreadable: {exc.strerror or exc}")
    except Exception as exc:  # pydicom raises many types on corrupt headers
        return ParkReason(None, f"not a readable DICOM file: {type(exc).__name__}: {exc}")
    meta = getattr(ds, "file_meta", None)
    meta_class = text_of(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    meta_uid = text_of(meta, "MediaStorageSOPInstanceUID") if meta is not None else ""
    # The C-STORE carries the data set's own UIDs; the File Meta header may disagree.
    sop_class = text_of(ds, "SOPClassUID") or meta_class
    sop_uid = text_of(ds, "SOPInstanceUID") or meta_uid
    ts = (text_of(meta, "TransferSyntaxUID") if meta is not None else "") or syntax_of_encoding(
        ds.original_encoding
    )
    if not sop_class or not sop_uid:
        return ParkReason(
            None, "DICOM file without SOP Class UID or SOP Instance UID", escaped(sop_uid)
        )
    for name, uid in (("SOP Class UID", sop_class), ("SOP Instance UID", sop_uid)):
        if not is_sendable_uid(uid):
            return ParkReason(None, f"invalid {name} {escaped(uid)!r}", escaped(sop_uid))
    if (meta_class and meta_class != sop_class) or (meta_uid and meta_uid != sop_uid):
        logger.warning(
            "UID-MISMATCH file=%s: File Meta says sop_class_uid=%s sop_instance_uid=%s, "
            "the data set says sop_class_uid=%s sop_instance_uid=%s; the data set's are sent",
            escaped(jf.display),
            escaped(meta_class),
            escaped(meta_uid),
            sop_class,
            sop_uid,
        )
    defect = bare_data_set_defect(jf.path, ts) if bare else find_defect(jf.path)
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
    )


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
        logger.warning(
            "REFERENCES-UNREADABLE file=%s: %s: %s; its RT references are not checked",
            escaped(display),
            type(exc).__name__,
            escaped(str(exc)),
        )
        return ()


def syntax_of_encoding(encoding: tuple[bool | None, bool | None]) -> str:
    """Return the uncompressed transfer syntax of pydicom's ``(implicit VR, little endian)``."""
    implicit, little = encoding
    if implicit is not False:
        return IMPLICIT_VR_LE
    return EXPLICIT_VR_LE if little is not False else ExplicitVRBigEndian


def read_bare_header(path: Path) -> Dataset | None:
    """Read the header of a data set stored without File Meta Information, or None.

    DCMTK's storescu sends such files (e.g. pydicom's ``rtstruct.dcm``); they count
    as DICOM only when their SOP Class and SOP Instance UIDs read as UIDs.
    """
    try:
        ds = dcmread(path, force=True, stop_before_pixels=True, specific_tags=list(FORWARD_TAGS))
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
    return bool(uid) and all("!" <= c <= "~" and c != "\\" for c in uid)

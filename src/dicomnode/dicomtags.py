"""Pure helpers on DICOM headers: safe names, header reads, enhanced-object detection.

Nothing here writes files, opens sockets or reads the clock. Reading a header
(:func:`read_header`) only opens the given file for reading. Imports pydicom and
the standard library.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag, Tag

#: Windows device names that cannot be used as a file or folder name, with or without extension.
WINDOWS_RESERVED: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(10)}
    | {f"LPT{i}" for i in range(10)}
    | {f"COM{c}" for c in "¹²³"}
    | {f"LPT{c}" for c in "¹²³"}
)
#: Names the forwarder never sends (see :func:`is_forwarder_reserved`): its parking folder
#: and the suffixes of files still being written. Hidden names (leading dot) are reserved too.
FORWARDER_RESERVED_NAMES: Final = frozenset({"failed"})
FORWARDER_RESERVED_SUFFIXES: Final = (".part", ".tmp")
_UNSAFE: Final = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f-\x9f]')
_SPACES: Final = re.compile(r"[\s_]+")
#: Names made only of ASCII letters, digits, inner dots and hyphens need no change.
_PLAIN: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?")
MAX_COMPONENT: Final = 64
#: File systems limit one name to 255 bytes (UTF-8 on Linux) or UTF-16 units; stay well below.
MAX_COMPONENT_BYTES: Final = 200

#: Tags read from every received or forwarded object (header only).
HEADER_TAGS: Final = (
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "StudyID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
    "SpecificCharacterSet",
    "NumberOfFrames",
)

#: The same tags as numbers (``group << 16 | element``).
HEADER_TAG_NUMBERS: Final = frozenset(int(tag_for_keyword(k) or 0) for k in HEADER_TAGS)

#: Enhanced multi-frame SOP classes that have a classic single-frame counterpart.
ENHANCED_TO_CLASSIC: Final = {
    "1.2.840.10008.5.1.4.1.1.4.1": "1.2.840.10008.5.1.4.1.1.4",  # Enhanced MR -> MR
    "1.2.840.10008.5.1.4.1.1.4.4": "1.2.840.10008.5.1.4.1.1.4",  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.2.1": "1.2.840.10008.5.1.4.1.1.2",  # Enhanced CT -> CT
    "1.2.840.10008.5.1.4.1.1.2.2": "1.2.840.10008.5.1.4.1.1.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.130": "1.2.840.10008.5.1.4.1.1.128",  # Enhanced PET -> PET
    "1.2.840.10008.5.1.4.1.1.128.1": "1.2.840.10008.5.1.4.1.1.128",  # Legacy Converted Enh. PET
}
ENHANCED_MR_COLOR: Final = "1.2.840.10008.5.1.4.1.1.4.3"


def safe_component(text: str, fallback: str = "UNKNOWN", max_len: int = MAX_COMPONENT) -> str:
    """Return ``text`` as a single folder or file name safe on Windows and Linux.

    The result contains no path separators, no control characters, none of
    ``<>:"/\\|?*``, is not ``.``/``..`` or a Windows device name, does not end in
    a dot or space, and has at most ``max_len`` characters. It is never empty, and
    never a name the forwarder reserves (``failed``, a hidden name, ``*.part``,
    ``*.tmp``, in any case): such a name gets a trailing ``_``, so a chained
    forwarder sends what the receiver filed.

    Parameters
    ----------
    text : str
        Any text, e.g. a decoded Patient Name.
    fallback : str
        Returned when nothing readable remains.
    max_len : int
        Maximum length of the result.
    """
    if (
        len(text) <= min(max_len, MAX_COMPONENT_BYTES)
        and _PLAIN.fullmatch(text)
        and text.split(".")[0].upper() not in WINDOWS_RESERVED
        and not is_forwarder_reserved(text)
    ):
        return text  # already safe (UIDs, most codes): _sanitise would return it unchanged
    return _sanitise(text, fallback, max_len)


def is_forwarder_reserved(name: str) -> bool:
    """Return True for a file or folder name the forwarder skips (never sends).

    ``failed`` (its parking folder, any case: Windows folders ignore case),
    hidden names (a leading ``.``) and ``*.part`` / ``*.tmp`` (files still being written).
    """
    lowered = name.lower()
    return (
        lowered in FORWARDER_RESERVED_NAMES
        or lowered.startswith(".")
        or lowered.endswith(FORWARDER_RESERVED_SUFFIXES)
    )


def _sanitise(text: str, fallback: str, max_len: int) -> str:
    """The full cleaning of :func:`safe_component`, for any text."""
    text = unicodedata.normalize("NFC", text)
    text = _UNSAFE.sub("_", text)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else "_" for ch in text)
    text = _SPACES.sub(lambda m: "_" if "_" in m.group() or len(m.group()) > 1 else " ", text)
    text = text.strip(" ._")
    text = text[:max_len].rstrip(" .")
    while len(text.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
        text = text[:-1].rstrip(" .")
    if not text:
        text = fallback[:max_len]
    if text.split(".")[0].upper().rstrip(" ") in WINDOWS_RESERVED:
        text = "_" + text[: max_len - 1]
    if is_forwarder_reserved(text):
        text = text[: max_len - 1] + "_"
        while len(text.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            text = text[:-2] + "_"
    return text


def short_hash(value: str, length: int = 8) -> str:
    """Return a stable hexadecimal digest of ``value`` (used to keep folder names unique)."""
    return hashlib.sha1(value.encode("ascii", "replace")).hexdigest()[:length]


def text_of(ds: Dataset, keyword: str, default: str = "") -> str:
    """Return an attribute as text without raising on odd or missing values."""
    try:
        value = ds.get(keyword)
    except Exception:
        return default
    if value is None:
        return default
    try:
        return str(value).strip()
    except Exception:
        return default


def read_header(path: Path, keywords: Sequence[str] = HEADER_TAGS) -> Dataset:
    """Read the header of a DICOM file, without pixel data.

    ``keywords`` are the elements read (default :data:`HEADER_TAGS`).

    Raises
    ------
    InvalidDicomError
        When the file is not DICOM (no preamble/meta and not a bare data set).
    OSError
        When it cannot be read.
    """
    return dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))


def header_from_elements(
    elements: dict[int, tuple[bytes, bytes]], implicit: bool, little: bool
) -> Dataset:
    """Return a header Dataset from raw element values, as :func:`read_header` would read it.

    Parameters
    ----------
    elements : dict
        ``tag -> (VR or b"" when implicit, raw value)``, e.g. from
        :func:`dicomnode.integrity.examine` with :data:`HEADER_TAG_NUMBERS`.
    implicit, little : bool
        Encoding of the values. Text is decoded lazily by pydicom, honouring
        Specific Character Set, exactly as for a data set read from a file.
    """
    raw: dict[BaseTag, DataElement | RawDataElement] = {}
    for number, (vr, value) in elements.items():
        tag = Tag(number)
        raw[tag] = RawDataElement(
            tag, vr.decode("ascii") if vr else None, len(value), value, 0, implicit, little
        )
    ds = Dataset(raw)
    ds.set_original_encoding(implicit, little)
    return ds


def is_dicom_file(path: Path) -> bool:
    """Return True when ``path`` starts with a DICOM preamble and ``DICM`` marker."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_valid_uid(uid: str) -> bool:
    """Return True for a syntactically valid UID (PS3.5 9.1): digits and dots, <= 64 chars."""
    return bool(re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+", uid)) and len(uid) <= 64


def is_convertible_enhanced(sop_class_uid: str) -> bool:
    """Return True for an Enhanced multi-frame SOP class with a classic counterpart."""
    return sop_class_uid in ENHANCED_TO_CLASSIC


__all__ = [
    "ENHANCED_TO_CLASSIC",
    "HEADER_TAGS",
    "HEADER_TAG_NUMBERS",
    "InvalidDicomError",
    "header_from_elements",
    "is_convertible_enhanced",
    "is_dicom_file",
    "is_forwarder_reserved",
    "is_valid_uid",
    "read_header",
    "safe_component",
    "short_hash",
    "text_of",
]

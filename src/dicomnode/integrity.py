"""Structural completeness check of a DICOM file: do its elements end where the file ends?

A sender can deliver a data set whose last element claims more bytes than were
sent (a truncated file re-sent by a broken peer, a disk error on its side).
pydicom reads such a header without complaint, so the receiver would file a
partial object under its final name and answer success. :func:`find_defect`
walks the element *headers* of the file (values are skipped, not read, so
memory stays flat for any object size) and names the first defect.
It decodes no values and never raises for bad input. :func:`examine` does the
same walk and also hands back the raw values of chosen top-level elements, so
the receiver gets the header it files by from the same pass (and, for objects
it still holds in memory, without reading the file again).

Deflated data sets (Deflated Explicit VR Little Endian) are inflated as a
stream, a bounded piece at a time: the header is walked from the first
:data:`MAX_DEFLATED_HEADER_BYTES` of inflated data (the whole data set is
walked when it fits), the rest is only counted, and an object that inflates
more than :data:`MAX_INFLATION_RATIO` times its compressed size beyond
:data:`INFLATION_FLOOR_BYTES` is a defect (a deflate bomb). Memory stays flat
whatever the object claims. :func:`read_header_bounded` gives the forwarder
and others the same bounded header read. Imports the standard library,
:mod:`dicomnode.dul.meta` (the one File Meta reader)
and :mod:`dicomnode.dicomtags` for :func:`read_header_bounded` (pydicom only there).

Length: a little over 500 lines: the element walker and the bounded inflation
it walks deflated data sets through are one check with one defect vocabulary.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


from dicomnode.dul.meta import (
    EXPLICIT_VR_BE,
    IMPLICIT_VR_LE,
    LONG_VRS,
    TRANSFER_SYNTAX_ELEMENT,
    MetaError,
    read_file_meta,
)
from dicomnode.dul.pdu import uid_text

#: Deflated Explicit VR Little Endian (PS3.5 A.5; the value of pydicom.uid, see dul.meta).
DEFLATED_VR_LE: Final = "1.2.840.10008.1.2.1.99"
#: Transfer syntaxes whose data set is deflated (PS3.5 A.5; JPIP Referenced Deflate, A.7).
#: (Deflated Image Frame Compression, 1.2.840.10008.1.2.8.1, deflates frames only.)
#: (JPIP Referenced Deflate has no constant in pydicom.uid.)
DEFLATED_SYNTAXES: Final = frozenset({DEFLATED_VR_LE, "1.2.840.10008.1.2.4.95"})
#: Inflated bytes kept in memory to walk a deflated data set's header (all of it if it fits).
MAX_DEFLATED_HEADER_BYTES: Final = 4 * 1024 * 1024
#: A deflated data set may inflate to more than this many times its compressed size ...
MAX_INFLATION_RATIO: Final = 100
#: ... only while it is below this size (an all-black image inflates ~1000:1).
INFLATION_FLOOR_BYTES: Final = 64 * 1024 * 1024
#: Compressed bytes fed to the inflater at a time, and inflated bytes taken at a time.
_INFLATE_IN_BYTES: Final = 64 * 1024
_INFLATE_OUT_BYTES: Final = 256 * 1024
#: First read of the File Meta Information (read again 16 times larger while it does not fit).
_META_HEAD_BYTES: Final = 4096
#: Bytes a :class:`_FileView` reads at a time (a small object's whole header in one read).
_VIEW_BLOCK_BYTES: Final = 64 * 1024
_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQ_END: Final = 0xFFFEE0DD
#: Float Pixel Data, Double Float Pixel Data, Pixel Data.
_PIXEL_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Explicit VRs with a 2-byte length (PS3.5 Table 7.1-2): the walker's fast path.
_SHORT_VRS: Final = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
#: Deeper nesting than this is refused (protects the walker from crafted input).
MAX_DEPTH: Final = 32


class _Defect(Exception):
    """Internal: the structure is broken; the message says where."""


class _Stop(Exception):
    """Internal: every wanted top-level element has been passed."""


class DeflatedDataSetError(ValueError):
    """A deflated data set is a bomb, cut off or corrupt: its header cannot be read safely.

    Not an ``InvalidDicomError`` on purpose: callers that retry a file pydicom
    calls "not DICOM" with ``force=True`` would then inflate the bomb whole.
    """


class _FileView:
    """Read-only slices of an open file (``view[a:b]`` reads those bytes).

    Used for files other processes may still change: a memory map would
    kill the process with SIGBUS if the file were truncated during the walk,
    while a short read here only ends the walk as a defect. Reads go through
    one block of :data:`_VIEW_BLOCK_BYTES` (``pread``), so a header walk costs
    one read for a small object and a few for a large one: skipped values
    (pixel data) are never read.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self.fd = fh.fileno()
        self.block = b""
        self.block_at = 0

    def __getitem__(self, where: slice) -> bytes:
        start, stop = where.start, max(where.start, where.stop)
        at = start - self.block_at
        if at >= 0 and stop - self.block_at <= len(self.block):
            return self.block[at : stop - self.block_at]
        if stop - start > _VIEW_BLOCK_BYTES:
            return os.pread(self.fd, stop - start, start)
        self.block = os.pread(self.fd, _VIEW_BLOCK_BYTES, start)
        self.block_at = start
        return self.block[: stop - start]


_Buffer = bytes | mmap.mmap | _FileView


class _Walker:
    """Walk element headers of one data set encoding in a buffer, bounded by byte offsets.

    ``buf`` is the whole object: bytes in memory or a read-only memory map of
    the file, so values are skipped without being read (a memory map touches
    only the pages holding element headers).
    """

    def __init__(
        self,
        buf: _Buffer,
        implicit: bool,
        little: bool,
        wanted: frozenset[int] = frozenset(),
    ) -> None:
        self.buf = buf
        self.pos = 0
        self.implicit = implicit
        order = "<" if little else ">"
        self.tag_length = struct.Struct(order + "HHL")
        self.short_length = struct.Struct(order + "H")
        self.long_length = struct.Struct(order + "L")
        #: Tag, VR and 2-byte length of an explicit VR element with a short VR, in one unpack.
        self.short_head = struct.Struct(order + "HH2sH")
        self.wanted = wanted
        #: Stop the walk (:class:`_Stop`) at the first top-level tag above this (0 = never).
        self.stop_after = 0
        #: Wanted values are taken only before the pixel data, as pydicom's
        #: ``stop_before_pixels`` reads them (an element after it is out of order).
        self.collecting = bool(wanted)
        #: Values of wanted top-level elements: tag -> (VR or b"", raw value).
        self.found: dict[int, tuple[bytes, bytes]] = {}

    def _need(self, n: int, end: int, what: str) -> int:
        """Return the current position after checking that ``n`` bytes are present; advance."""
        pos = self.pos
        if pos + n > end:
            raise _Defect(f"{what} at byte {pos} is cut off ({end - pos} of {n} bytes present)")
        self.pos = pos + n
        return pos

    def _skip(self, length: int, end: int, tag: int) -> None:
        pos = self.pos
        if pos + length > end:
            raise _Defect(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) claims {length} bytes at byte "
                f"{pos} but only {max(end - pos, 0)} remain"
            )
        self.pos = pos + length

    def _tag_length(self, end: int, implicit: bool) -> tuple[int, bytes, int]:
        """Read one element header; return (tag, VR or b'', length)."""
        at = self._need(8, end, "element header")
        group, elem, length = self.tag_length.unpack(self.buf[at : at + 8])
        tag = (group << 16) | elem
        if group == 0xFFFE or implicit:
            return tag, b"", length
        vr = self.buf[at + 4 : at + 6]
        if not (vr.isalpha() and vr.isupper()):
            raise _Defect(f"element ({group:04X},{elem:04X}) has no valid VR {vr!r}")
        if vr in LONG_VRS:
            at = self._need(4, end, "element length")
            (length,) = self.long_length.unpack(self.buf[at : at + 4])
        else:
            (length,) = self.short_length.unpack(self.buf[at + 6 : at + 8])
        return tag, vr, length

    def walk_dataset(self, end: int, depth: int, implicit: bool, until_item_end: bool) -> None:
        """Walk elements up to ``end`` (or to an item delimiter when ``until_item_end``)."""
        if depth > MAX_DEPTH:
            raise _Defect(f"sequences nested deeper than {MAX_DEPTH} levels")
        buf = self.buf
        short_head = self.short_head
        top = depth == 0
        wanted = self.wanted if top else frozenset()
        stop_after = self.stop_after if top else 0
        while True:
            pos = self.pos
            if pos >= end:
                if until_item_end:
                    raise _Defect("item without its delimiter: the data set is cut off")
                return
            if not until_item_end and end - pos < 8:
                if buf[pos:end].strip(b"\x00"):
                    raise _Defect(f"{end - pos} stray bytes at the end of the data set")
                self.pos = end
                return
            if implicit or pos + 8 > end:
                tag, vr, length = self._tag_length(end, implicit)
            else:  # inlined _tag_length for the common explicit VR short element
                group, elem, vr, length = short_head.unpack(buf[pos : pos + 8])
                if group == 0xFFFE or (
                    vr not in _SHORT_VRS and (vr in LONG_VRS or not (vr.isalpha() and vr.isupper()))
                ):
                    tag, vr, length = self._tag_length(end, implicit)
                else:
                    tag = (group << 16) | elem
                    self.pos = pos + 8
            if tag >= _ITEM:  # group FFFE: only delimiters may appear here
                if tag == _ITEM_END:
                    if until_item_end:
                        return
                    raise _Defect(f"item delimiter outside an item at byte {pos}")
                if tag in (_ITEM, _SEQ_END):
                    raise _Defect(f"item tag outside a sequence at byte {pos}")
            if top:
                if tag in _PIXEL_TAGS:
                    self.collecting = False
                if stop_after and (tag > stop_after or tag in _PIXEL_TAGS):
                    raise _Stop
            if length != _UNDEFINED:
                value_at = self.pos
                if value_at + length > end:
                    self._skip(length, end, tag)  # raises the defect
                self.pos = value_at + length
                if tag in wanted and self.collecting:
                    self.found[tag] = (vr, buf[value_at : value_at + length])
                continue
            # Undefined length: a sequence, encapsulated pixel data, or UN holding an
            # implicit VR little endian sequence (PS3.5 6.2.2).
            nested_implicit = implicit or vr == b"UN"
            value_at = self.pos
            self.walk_items(end, depth + 1, nested_implicit, encapsulated=vr in (b"OB", b"OW"))
            if tag in wanted and self.collecting:
                # the items without the sequence delimiter: a defined-length value
                self.found[tag] = (vr, buf[value_at : self.pos - 8])

    def walk_items(self, end: int, depth: int, implicit: bool, encapsulated: bool) -> None:
        """Walk the items of an undefined-length element up to its sequence delimiter."""
        if depth > MAX_DEPTH:
            raise _Defect(f"sequences nested deeper than {MAX_DEPTH} levels")
        while True:
            pos = self._need(8, end, "item header")
            tag_group, tag_elem, length = self.tag_length.unpack(self.buf[pos : pos + 8])
            tag = (tag_group << 16) | tag_elem
            if tag == _SEQ_END:
                return
            if tag != _ITEM:
                raise _Defect(f"expected an item or sequence delimiter at byte {pos}")
            if length != _UNDEFINED:
                self._skip(length, end, tag)
            elif encapsulated:
                raise _Defect(f"pixel data fragment of undefined length at byte {pos}")
            else:
                self.walk_dataset(end, depth + 1, implicit, until_item_end=True)


def _read_meta(buf: _Buffer, size: int) -> tuple[str, int]:
    """Return (transfer syntax UID, offset of the data set) of a Part 10 object."""
    values, start = _read_meta_values(buf, size)
    return uid_text(values.get(TRANSFER_SYNTAX_ELEMENT, b"")), start


def _read_meta_values(buf: _Buffer, size: int) -> tuple[dict[int, bytes], int]:
    """Return (File Meta values by element number, offset of the data set) of a Part 10 object."""
    want = _META_HEAD_BYTES
    while True:
        head = buf[0 : min(size, want)]
        whole = len(head) >= size
        try:
            values, start = read_file_meta(head, whole)
        except MetaError as exc:
            raise _Defect(str(exc)) from None
        except EOFError:
            if whole:
                raise _Defect("File Meta Information runs past the end of the file") from None
            want *= 16
            continue
        return values, start


@dataclass(frozen=True, slots=True)
class Examination:
    """What one walk of a Part 10 object found.

    Attributes
    ----------
    defect : str or None
        Why the object is structurally incomplete, or None when it is whole.
    syntax : str
        Transfer Syntax UID from the File Meta Information.
    implicit, little : bool
        The encoding the data set was walked with (see :func:`examine`).
    elements : dict
        ``tag -> (VR or b"" when implicit, raw value)`` of the wanted top-level
        elements present before the pixel data (of the inflated data set when
        the object is deflated). A sequence of undefined length is given as its
        items without the sequence delimiter.
    meta : dict
        ``element number of group 0002 -> raw value`` of the File Meta
        Information (empty when it could not be read).
    data_start : int
        Offset of the data set in the file, -1 when the File Meta Information
        could not be read (no preamble, or malformed).
    """

    defect: str | None
    syntax: str = ""
    implicit: bool = False
    little: bool = True
    elements: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    meta: dict[int, bytes] = field(default_factory=dict)
    data_start: int = -1

    @property
    def deflated(self) -> bool:
        """Return True when the data set is deflated (``elements`` come from bounded inflation)."""
        return self.syntax in DEFLATED_SYNTAXES


def examine(
    source: Path | bytes | bytearray | memoryview,
    wanted: frozenset[int] = frozenset(),
    private: bool = False,
) -> Examination:
    """Walk a Part 10 object once: its structural defect and the raw values of ``wanted`` tags.

    Parameters
    ----------
    source : Path or bytes-like
        The file, or its complete content already in memory.
    wanted : frozenset of int
        Top-level tags (``group << 16 | element``) whose values to return.
    private : bool
        True when no other process can change the file while it is walked (the
        receiver's own temp files): it is then read through a memory map, which
        is faster but fatal (SIGBUS) if the file were truncated meanwhile.

    Returns
    -------
    Examination
        ``defect`` is a one-line reason (e.g. an element claiming more bytes than
        remain) or None when every element fits and the data set ends at the end.
        A deflated data set is inflated as a bounded stream (see the module
        notes); a deflate bomb, a cut-off zlib stream or a header beyond
        :data:`MAX_DEFLATED_HEADER_BYTES` is a defect.

    Raises
    ------
    OSError
        When a file cannot be opened or read.
    """
    if isinstance(source, Path):
        with open(source, "rb", buffering=0) as fh:  # only its descriptor is used
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return _examine(b"", 0, wanted)
            if not private:
                if size <= _VIEW_BLOCK_BYTES:  # a small object: one read, walked in memory
                    data = os.pread(fh.fileno(), size, 0)
                    return _examine(data, len(data), wanted)
                return _examine(_FileView(fh), size, wanted)
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return _examine(mapped, len(mapped), wanted)
    data = source if isinstance(source, bytes) else bytes(source)
    return _examine(data, len(data), wanted)


def _examine(buf: _Buffer, size: int, wanted: frozenset[int]) -> Examination:
    syntax = ""
    implicit, little = False, True
    meta: dict[int, bytes] = {}
    start = -1
    try:
        values, data_start = _read_meta_values(buf, size)
        syntax = uid_text(values.get(TRANSFER_SYNTAX_ELEMENT, b""))
        meta, start = values, data_start
        if syntax in DEFLATED_SYNTAXES:
            exam = _examine_deflated(buf, start, size, syntax, wanted)
            return replace(exam, meta=meta, data_start=start)
        implicit = syntax == IMPLICIT_VR_LE
        little = syntax != EXPLICIT_VR_BE
        if not implicit and start + 6 <= size:
            # Some senders write implicit VR under an explicit transfer syntax;
            # pydicom reads those, so judge them by what they really are.
            vr = buf[start + 4 : start + 6]
            implicit = not (vr.isalpha() and vr.isupper())
        walker = _Walker(buf, implicit, little, wanted)
        walker.pos = start
        walker.walk_dataset(size, 0, implicit, until_item_end=False)
    except _Defect as defect:
        return Examination(str(defect), syntax, implicit, little, {}, meta, start)
    except (struct.error, ValueError, OverflowError) as exc:
        why = f"malformed element structure: {exc}"
        return Examination(why, syntax, implicit, little, {}, meta, start)
    return Examination(None, syntax, implicit, little, walker.found, meta, start)


def sequence_items(
    value: bytes, implicit: bool, little: bool, wanted: frozenset[int]
) -> list[dict[int, tuple[bytes, bytes]]]:
    """Return the ``wanted`` elements of each item of a sequence value, in item order.

    ``value`` is a sequence's items as :func:`examine` collects them (the
    sequence delimiter left off, or present). Each item gives
    ``tag -> (VR or b"" when implicit, raw value)`` of its own (not nested)
    elements; a nested sequence comes as its items, to be split the same way.

    Raises
    ------
    ValueError
        When the items are malformed (the same rules as :func:`examine`).
    """
    order = "<" if little else ">"
    head = struct.Struct(order + "HHL")
    items: list[dict[int, tuple[bytes, bytes]]] = []
    pos, end = 0, len(value)
    try:
        while pos + 8 <= end:
            group, elem, length = head.unpack_from(value, pos)
            tag = (group << 16) | elem
            if tag == _SEQ_END:
                break
            if tag != _ITEM:
                raise _Defect(f"expected an item at byte {pos}")
            walker = _Walker(value, implicit, little, wanted)
            walker.pos = pos + 8
            if length == _UNDEFINED:
                walker.walk_dataset(end, 0, implicit, until_item_end=True)
                pos = walker.pos
            else:
                if pos + 8 + length > end:
                    raise _Defect(f"item at byte {pos} claims {length} bytes")
                pos += 8 + length
                walker.walk_dataset(pos, 0, implicit, until_item_end=False)
            items.append(walker.found)
    except _Defect as defect:
        raise ValueError(str(defect)) from None
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"malformed sequence: {exc}") from None
    return items


def _inflated(buf: _Buffer, start: int, size: int) -> Iterator[bytes]:
    """Yield the inflated data set of ``buf[start:size]`` in pieces; enforce the ratio limit.

    Raises
    ------
    _Defect
        When the stream is cut off or corrupt, or inflates like a bomb.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pos = start
    data = b""
    total = 0
    while not inflater.eof:
        if not data and pos < size:
            data = bytes(buf[pos : min(size, pos + _INFLATE_IN_BYTES)])
            pos += len(data)
        try:
            out = inflater.decompress(data, _INFLATE_OUT_BYTES)
        except zlib.error as exc:
            raise _Defect(f"deflated data set is corrupt: {exc}") from None
        data = inflater.unconsumed_tail
        if not out and not data and pos >= size and not inflater.eof:
            raise _Defect("deflated data set is cut off (its zlib stream does not end)")
        total += len(out)
        compressed = pos - start - len(data)
        if total > INFLATION_FLOOR_BYTES and total > MAX_INFLATION_RATIO * max(compressed, 1):
            raise _Defect(
                f"deflated data set inflates to more than {MAX_INFLATION_RATIO} times its "
                f"{compressed} compressed bytes ({total} bytes so far): refused as a deflate bomb"
            )
        if out:
            yield out


def _walk_inflated(
    head: bytes, wanted: frozenset[int], stop_after: int
) -> tuple[dict[int, tuple[bytes, bytes]], bool]:
    """Walk inflated data; return (wanted values, whether the walk reached its end or stop)."""
    implicit = False
    if len(head) >= 6:
        vr = head[4:6]
        implicit = not (vr.isalpha() and vr.isupper())
    walker = _Walker(head, implicit, True, wanted)
    walker.stop_after = stop_after
    try:
        walker.walk_dataset(len(head), 0, implicit, until_item_end=False)
    except _Stop:
        return walker.found, True
    return walker.found, not stop_after


def _examine_deflated(
    buf: _Buffer, start: int, size: int, syntax: str, wanted: frozenset[int]
) -> Examination:
    """Examine a deflated data set by bounded, streaming inflation.

    The first :data:`MAX_DEFLATED_HEADER_BYTES` inflated bytes are kept: if the
    whole data set fits, it is walked like any other (defects, wanted values);
    otherwise the wanted values are taken from that prefix (the walk stops past
    the highest wanted tag) and the rest is inflated only to be counted.
    """
    head = bytearray()
    keeping = True
    found: dict[int, tuple[bytes, bytes]] | None = None
    stop_after = max(wanted) if wanted else 0
    next_try = 64 * 1024
    try:
        for piece in _inflated(buf, start, size):
            if not keeping:
                continue
            head += piece
            if stop_after and found is None and len(head) >= next_try:
                next_try *= 2
                try:
                    values, done = _walk_inflated(bytes(head), wanted, stop_after)
                except _Defect:
                    done = False  # the piece ends mid-element: inflate more
                if done:
                    found = values
            if len(head) > MAX_DEFLATED_HEADER_BYTES:
                if stop_after and found is None:
                    try:
                        values, done = _walk_inflated(bytes(head), wanted, stop_after)
                    except _Defect as defect:
                        raise _Defect(f"deflated data set: {defect}") from None
                    if not done:
                        raise _Defect(
                            "the header of the deflated data set does not end within its first "
                            f"{MAX_DEFLATED_HEADER_BYTES} inflated bytes"
                        )
                    found = values
                keeping = False
                head = bytearray()
        if keeping:  # the whole data set is in memory: walk all of it
            try:
                values, _ = _walk_inflated(bytes(head), wanted, 0)
            except _Defect as defect:
                return Examination(f"deflated data set: {defect}", syntax)
            found = values
    except _Defect as defect:
        return Examination(str(defect), syntax)
    except (struct.error, ValueError, OverflowError) as exc:
        return Examination(f"malformed deflated data set: {exc}", syntax)
    return Examination(None, syntax, False, True, found or {})


def read_header_bounded(path: Path, keywords: Sequence[str] | None = None) -> Dataset:
    """Read the header of a DICOM file like :func:`dicomnode.dicomtags.read_header`, bounded.

    ``keywords`` are the elements read (default: :data:`dicomnode.dicomtags.HEADER_TAGS`).

    Deflated data sets are not inflated whole (pydicom would): the header comes
    from :func:`examine`'s streaming inflation, and a deflate bomb or a corrupt
    stream raises. Other files are read by pydicom without pixel data.

    Raises
    ------
    InvalidDicomError
        When the file is not DICOM.
    DeflatedDataSetError
        When its deflated data set is a bomb, cut off or corrupt.
    OSError
        When it cannot be read.
    """
    from pydicom.filereader import read_file_meta_info
    from pydicom.tag import Tag

    from dicomnode.dicomtags import HEADER_TAGS, header_from_elements, read_header

    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            syntax, _ = _read_meta(_FileView(fh), size)
        except (_Defect, struct.error, ValueError):
            syntax = ""
    names = HEADER_TAGS if keywords is None else tuple(keywords)
    if syntax not in DEFLATED_SYNTAXES:
        return read_header(path, names)
    exam = examine(path, frozenset(int(Tag(k)) for k in names))
    if exam.defect is not None:
        raise DeflatedDataSetError(exam.defect)
    ds = header_from_elements(exam.elements, False, True)
    ds.file_meta = read_file_meta_info(path)
    return ds


def find_defect(path: Path) -> str | None:
    """Return why the object in ``path`` is structurally incomplete, or None when it is whole.

    Parameters
    ----------
    path : Path
        A DICOM Part 10 file (preamble, ``DICM``, file meta, data set), such as
        the temporary file pynetdicom streams a received data set into.

    Returns
    -------
    str or None
        A one-line reason (e.g. an element claiming more bytes than remain), or
        None when every element fits and the data set ends at the end of the file.
        Deflated data sets are inflated as a bounded stream (see :func:`examine`).

    Raises
    ------
    OSError
        When the file cannot be opened or read.
    """
    return examine(path).defect

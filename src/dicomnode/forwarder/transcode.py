"""Convert one stored object to a transfer syntax the target accepted, or say why not.

The forwarder sends every file in its own transfer syntax when the target
accepts it. Only otherwise is the object converted here, always keeping its SOP
Instance UID (as Orthanc and dcm4chee do), into one of :data:`CONVERSION_TARGETS`:

* Deflated Explicit VR Little Endian → Explicit VR Little Endian: the data set
  is inflated, nothing is decoded (PS3.5 A.5: the inflated stream *is* the
  Explicit VR Little Endian data set);
* Explicit VR Big Endian → little endian: pydicom re-encodes every element whose
  value it decodes (US, SS, UL, FL, AT ...); the values it keeps as bytes (OW, OF,
  OL, OD, OV) are byte-swapped here, word by word;
* encapsulated (RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 ...) →
  uncompressed, with pydicom's pixel decoders (``pylibjpeg`` and its
  ``-libjpeg``, ``-openjpeg`` and ``-rle`` plugins, and ``python-gdcm``, whose
  IJG libjpeg decodes lossy JPEG to the same values as DCMTK; all runtime
  dependencies).
  Decompressing a lossy compression keeps (or sets) *Lossy Image Compression* =
  ``01`` and says so in :attr:`Transcoded.lossy`.

Every conversion that touches pixel data is checked: the converted data set is
decoded again and its pixel values must equal those of the source, otherwise
:class:`TranscodeError` is raised and the object is not sent. Pure apart from
reading the one file it is given; never imports pynetdicom or the network code.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

if TYPE_CHECKING:  # numpy is imported where pixels are decoded, so processes that
    import numpy as np  # never decode keep it out (see dicomnode.codecs)

logger = logging.getLogger(__name__)

#: What a conversion can produce, in order of preference (Explicit VR keeps every VR).
CONVERSION_TARGETS: Final = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: Transfer syntaxes that are always lossy (JPEG baseline, extended and the retired
#: lossy processes). Pixel data decompressed from them gets Lossy Image Compression 01.
LOSSY_SYNTAXES: Final = frozenset(
    {
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        "1.2.840.10008.1.2.4.52",
        "1.2.840.10008.1.2.4.53",
        "1.2.840.10008.1.2.4.54",
        "1.2.840.10008.1.2.4.55",
        "1.2.840.10008.1.2.4.56",
        "1.2.840.10008.1.2.4.59",
        "1.2.840.10008.1.2.4.60",
        "1.2.840.10008.1.2.4.61",
        "1.2.840.10008.1.2.4.62",
        "1.2.840.10008.1.2.4.63",
        "1.2.840.10008.1.2.4.64",
    }
)

#: Lossy JPEG processes preferably decoded by GDCM (IJG libjpeg, as DCMTK).
_IJG_DECODED: Final = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})
#: Bytes per word of the VRs whose values pydicom keeps as raw bytes.
_WORD_BYTES: Final = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
#: Elements that only describe encapsulated pixel data.
_ENCAPSULATION_ONLY: Final = (Tag(0x7FE0, 0x0001), Tag(0x7FE0, 0x0002))
_PIXEL_DATA: Final = Tag(0x7FE0, 0x0010)
_PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class TranscodeError(Exception):
    """The object cannot be converted into any accepted transfer syntax without changing it."""


@dataclass(frozen=True, slots=True)
class Transcoded:
    """An object encoded for the target.

    Attributes
    ----------
    data : bytes
        The encoded data set (no File Meta Information), of even length.
    transfer_syntax : str
        Its transfer syntax UID, one of :data:`CONVERSION_TARGETS`.
    lossy : bool
        True when the pixel data was decompressed from a lossy compression
        (*Lossy Image Compression* is ``01`` in ``data``).
    how : str
        What was done, for the log (e.g. ``"inflated"``).
    """

    data: bytes
    transfer_syntax: str
    lossy: bool
    how: str


def syntax_name(uid: str) -> str:
    """Return the transfer syntax's name (the UID itself when pydicom does not know it)."""
    name = UID(uid).name
    return name if name and name != uid else uid


def choose_syntax(source: str, accepted: Collection[str]) -> str | None:
    """Return the transfer syntax to send an object of syntax ``source`` in.

    Parameters
    ----------
    source : str
        The file's transfer syntax UID.
    accepted : collection of str
        What the target accepted for the object's SOP class.

    Returns
    -------
    str or None
        ``source`` itself when accepted (sent unchanged), else the first of
        :data:`CONVERSION_TARGETS` the target accepted, else None.
    """
    if source in accepted:
        return source
    return next((ts for ts in CONVERSION_TARGETS if ts in accepted), None)


def transcode(path: Path, source: str, target: str, data_start: int) -> Transcoded:
    """Convert the object in ``path`` from ``source`` to ``target`` (one of the conversion targets).

    Parameters
    ----------
    path : Path
        The Part 10 file.
    source : str
        Its transfer syntax UID (from its File Meta Information).
    target : str
        Explicit or Implicit VR Little Endian.
    data_start : int
        Offset of the data set in the file (right after the File Meta Information).

    Returns
    -------
    Transcoded

    Raises
    ------
    TranscodeError
        When the object cannot be decoded or re-encoded, or the converted pixel
        values would differ from the source's.
    FileNotFoundError
        When the file vanished.
    """
    if target not in CONVERSION_TARGETS:
        raise TranscodeError(f"cannot convert into {syntax_name(target)}")
    try:
        if source == DeflatedExplicitVRLittleEndian:
            return _from_deflated(path, target, data_start)
        return _reencoded(path, source, target)
    except (TranscodeError, FileNotFoundError):
        raise
    except Exception as exc:  # pydicom and the codecs raise many types on bad input
        raise TranscodeError(f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- deflate


def inflate_data_set(raw: bytes) -> bytes:
    """Return the Explicit VR Little Endian data set of a deflated one (PS3.5 A.5).

    A trailing pad byte after the end of the deflate stream is ignored.

    Raises
    ------
    TranscodeError
        When the stream is corrupt or incomplete.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(raw) + inflater.flush()
    except zlib.error as exc:
        raise TranscodeError(f"corrupt deflated data set: {exc}") from exc
    if not inflater.eof:
        raise TranscodeError("deflated data set ends before its deflate stream does")
    return data


def _from_deflated(path: Path, target: str, data_start: int) -> Transcoded:
    with path.open("rb") as fh:
        fh.seek(data_start)
        data = inflate_data_set(fh.read())
    if len(data) % 2:
        raise TranscodeError(f"inflated data set has an odd length ({len(data)} bytes)")
    if target == ExplicitVRLittleEndian:
        return Transcoded(data, target, False, "inflated")
    ds = read_dataset(io.BytesIO(data), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    return Transcoded(_encode_checked(ds, target), target, False, "inflated, implicit VR")


# --------------------------------------------------------------------------- re-encoding


def _reencoded(path: Path, source: str, target: str) -> Transcoded:
    ds = dcmread(path, force=True)  # force: a bare data set without File Meta Information
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = UID(source)
    uid = UID(source)
    has_pixels = any(k in ds for k in _PIXEL_KEYWORDS)
    lossy = False
    how: str
    expected: np.ndarray | None
    if uid.is_encapsulated and has_pixels:
        decoder = get_decoder(uid)
        if not decoder.is_available:
            raise TranscodeError(
                f"no decoder for {syntax_name(source)} is installed "
                f"({'; '.join(decoder.missing_dependencies) or 'unsupported'})"
            )
        lossy = source in LOSSY_SYNTAXES or str(ds.get("LossyImageCompression", "")) == "01"
        expected = _decompress(ds, path, source, decoder.available_plugins)
        for tag in _ENCAPSULATION_ONLY:
            if tag in ds:
                del ds[tag]
        if lossy:
            ds.LossyImageCompression = "01"
        how = "decompressed" + (" (lossy source: LossyImageCompression=01)" if lossy else "")
    elif uid.is_encapsulated:
        expected = None  # no pixel data to decode (e.g. a compressed syntax on a non-image)
        how = "re-encoded (no pixel data)"
    elif source == ExplicitVRBigEndian:
        expected = _pixels(ds) if has_pixels else None
        _swap_raw_words(ds)
        how = "byte order changed to little endian"
    elif uid.is_transfer_syntax and not uid.is_compressed and uid.is_little_endian:
        expected = None  # the pixel bytes are copied, not transformed: compared as bytes
        how = "re-encoded"
    else:
        raise TranscodeError(f"no conversion from {syntax_name(source)}")
    _drop_group_lengths(ds)
    data = _encode_checked(ds, target, expected)
    return Transcoded(data, target, lossy, how)


def _decompress(ds: Dataset, path: Path, source: str, plugins: Collection[str]) -> np.ndarray:
    """Decompress ``ds`` in place (keeping its SOP Instance UID); return the decoded pixels.

    Lossy JPEG is decoded with GDCM's IJG libjpeg where it can (the same
    decoder as DCMTK's, so the values equal ``dcmdjpeg``'s; other JPEG decoders
    may round differently): through pydicom's GDCM plugin, else (12-bit JPEG
    Extended, which that plugin declines) with GDCM on the whole file. Everything
    else goes to pylibjpeg first (exact for the lossless syntaxes; pydicom's GDCM
    plugin trips over some pixel representation fixes), then GDCM, then any plugin.
    """
    gdcm = ["gdcm"] if "gdcm" in plugins else []
    pylibjpeg = ["pylibjpeg"] if "pylibjpeg" in plugins else []
    if source in _IJG_DECODED:
        steps = [*gdcm, "gdcm-file", *pylibjpeg, ""]
    else:
        steps = [*pylibjpeg, *gdcm, "gdcm-file", ""]
    failure: Exception | None = None
    for step in steps:
        try:
            if step == "gdcm-file":
                return _decompress_with_gdcm(ds, path)
            ds.pixel_array_options(decoding_plugin=step)
            expected = _pixels(ds)
            ds.decompress(decoding_plugin=step, generate_instance_uid=False)
        except Exception as exc:  # the decoders raise many types on bad input
            failure = exc
            continue
        return expected
    if isinstance(failure, TranscodeError):
        raise failure
    raise TranscodeError(f"pixel data cannot be decoded: {type(failure).__name__}: {failure}")


def _decompress_with_gdcm(ds: Dataset, path: Path) -> np.ndarray:
    """Decompress the pixel data of ``path`` with GDCM into ``ds`` (native, little endian)."""
    import gdcm  # python-gdcm; imported only for the rare files that need it

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise TranscodeError("GDCM cannot read the file")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise TranscodeError("GDCM cannot decompress the pixel data")
    image = change.GetOutput()
    data: bytes = image.GetBuffer().encode("utf-8", "surrogateescape")
    expected_length = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel)
    expected_length *= int(ds.get("NumberOfFrames", 1) or 1) * ((int(ds.BitsAllocated) + 7) // 8)
    if len(data) != expected_length:
        raise TranscodeError(f"GDCM gave {len(data)} bytes of pixel data, not {expected_length}")
    if len(data) % 2:
        data += b"\0"
    ds.PixelData = data
    elem = ds["PixelData"]
    elem.VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    elem.is_undefined_length = False
    ds.file_meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    ds.PhotometricInterpretation = str(image.GetPhotometricInterpretation().GetString()).strip()
    if int(ds.SamplesPerPixel) > 1:
        ds.PlanarConfiguration = int(image.GetPlanarConfiguration())
    ds.pixel_array_options(decoding_plugin="")
    return _pixels(ds)


def _pixels(ds: Dataset) -> np.ndarray:
    """Return the decoded pixel values of ``ds`` (color converted as pydicom does by default)."""
    import numpy as np

    try:
        pixels: np.ndarray = np.array(ds.pixel_array, copy=True)
    except Exception as exc:  # the decoders raise many types on bad input
        raise TranscodeError(f"pixel data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    return pixels


def _swap_raw_words(ds: Dataset) -> None:
    """Byte-swap, in place, every OW/OF/OL/OD/OV value of ``ds`` and its sequences.

    OW values are swapped in 16-bit words, except Pixel Data with 32 or 64 bits
    allocated, whose pixels are swapped whole (pydicom's reading of such files).

    Raises
    ------
    TranscodeError
        For a value that is not a whole number of words, or encapsulated (undefined length).
    """
    import numpy as np

    bits = int(ds.get("BitsAllocated", 0) or 0)
    for elem in ds.iterall():
        width = _WORD_BYTES.get(str(elem.VR))
        if width == 2 and elem.tag == _PIXEL_DATA and bits in (32, 64):
            # 32/64-bit pixels in OW: each pixel one big endian value, as pydicom reads
            # them (DCMTK swaps 16-bit words instead; the standard leaves this murky)
            width = bits // 8
        value = elem.value
        if width is None or not value:
            continue
        if not isinstance(value, bytes | bytearray) or elem.is_undefined_length:
            raise TranscodeError(f"{elem.tag} ({elem.VR}) cannot be byte-swapped")
        if len(value) % width:
            raise TranscodeError(
                f"{elem.tag} ({elem.VR}) has {len(value)} bytes, not a whole number of words"
            )
        elem.value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def _drop_group_lengths(ds: Dataset) -> None:
    """Remove retired group length elements (gggg,0000): re-encoding can change the lengths."""
    for tag in [t for t in ds.keys() if t.element == 0 and t.group != 0x0002]:  # noqa: SIM118 (a Dataset iterates elements)
        del ds[tag]


def _encode_checked(ds: Dataset, target: str, expected: np.ndarray | None = None) -> bytes:
    """Encode ``ds`` in ``target``; read it back and compare its pixel data.

    The pixel data elements must come back byte for byte as they are in ``ds``,
    and, when ``expected`` is given, decode to exactly those values.
    """
    import numpy as np

    implicit = target == ImplicitVRLittleEndian
    for _elem in ds.iterall():
        pass  # decode every raw element now: each gets its VR (implicit VR sources)
    out = DicomBytesIO()
    out.is_little_endian = True
    out.is_implicit_VR = implicit
    write_dataset(out, ds)
    data = out.getvalue()
    if len(data) % 2:
        raise TranscodeError(f"encoded data set has an odd length ({len(data)} bytes)")
    again = read_dataset(io.BytesIO(data), is_implicit_VR=implicit, is_little_endian=True)
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds and bytes(again.get(keyword, b"")) != bytes(ds[keyword].value):
            raise TranscodeError(f"{keyword} changed while being encoded; not sent")
    if expected is not None:
        again.file_meta = FileMetaDataset()
        again.file_meta.TransferSyntaxUID = UID(target)
        got = _pixels(again)
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise TranscodeError(
                f"converted pixel values differ from the source's "
                f"(shape {got.shape} vs {expected.shape}); not sent"
            )
    return data

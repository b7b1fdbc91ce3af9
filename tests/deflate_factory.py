"""Deflated Explicit VR Little Endian objects built in code, including deflate bombs.

A bomb is an ordinary header followed by Pixel Data of ``zero_bytes`` zeros,
deflated as a stream: a few hundred KB on the wire or on disk that inflate to
hundreds of MB. Nothing of the inflated size is ever held in memory here.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

DEFLATED = "1.2.840.10008.1.2.1.99"
_CHUNK = 4 * 1024 * 1024


def _plain_header(ds: Dataset) -> bytes:
    header = Dataset()
    for element in ds:
        if element.tag < 0x7FE00000:
            header.add(element)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, header)
    return bytes(fp.getvalue())


def deflated_data_set(ds: Dataset, zero_bytes: int) -> bytes:
    """Return ``ds`` (without its pixel data) plus ``zero_bytes`` of zero Pixel Data, deflated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [packer.compress(_plain_header(ds))]
    out.append(packer.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, zero_bytes)))
    zeros = bytes(_CHUNK)
    left = zero_bytes
    while left:
        piece = min(left, _CHUNK)
        out.append(packer.compress(zeros[:piece]))
        left -= piece
    out.append(packer.flush())
    return b"".join(out)


def save_deflated(ds: Dataset, zero_bytes: int, path: Path) -> Path:
    """Write ``ds`` as a Deflated Explicit VR Little Endian Part 10 file (see above)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DEFLATED
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x00" * 128 + b"DICM" + bytes(fp.getvalue()) + deflated_data_set(ds, zero_bytes)
    )
    return path

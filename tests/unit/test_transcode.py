"""Conversion of one object for a target: choice of syntax, inflate, byte order, decompression."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from dicomnode.forwarder.batching import ObjectInfo, category_rank
from dicomnode.forwarder.state import RetryState, StateStore
from dicomnode.forwarder.transcode import (
    TranscodeError,
    choose_syntax,
    inflate_data_set,
    transcode,
)
from tests.factories import make_image, save

EXPLICIT, IMPLICIT = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)


def data_start(path: Path) -> int:
    raw = path.read_bytes()
    (group_length,) = struct.unpack("<I", raw[140:144])
    return 144 + group_length


def decoded(data: bytes, syntax: str) -> Dataset:
    ds = read_dataset(io.BytesIO(data), is_implicit_VR=syntax == IMPLICIT, is_little_endian=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def test_choose_syntax_prefers_the_files_own_then_explicit_then_implicit() -> None:
    rle = str(RLELossless)
    assert choose_syntax(rle, {rle, EXPLICIT}) == rle
    assert choose_syntax(rle, {IMPLICIT, EXPLICIT}) == EXPLICIT
    assert choose_syntax(rle, {IMPLICIT}) == IMPLICIT
    assert choose_syntax(rle, {str(ExplicitVRBigEndian)}) is None


def test_inflate_ignores_the_pad_byte_and_rejects_broken_streams() -> None:
    body = b"\x08\x00\x18\x00UI\x04\x001.2\x00"
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = packer.compress(body) + packer.flush()
    assert inflate_data_set(stream + b"\0") == body
    with pytest.raises(TranscodeError, match="ends before"):
        inflate_data_set(stream[:-3])
    with pytest.raises(TranscodeError, match="corrupt"):
        inflate_data_set(b"\xff" * 20)


def test_deflated_file_inflated_without_decoding(tmp_path: Path) -> None:
    path = Path(str(get_testdata_file("image_dfl.dcm")))
    start = data_start(path)
    explicit = transcode(path, str(DeflatedExplicitVRLittleEndian), EXPLICIT, start)
    raw = path.read_bytes()[start:]
    assert explicit.data == zlib.decompress(raw, -zlib.MAX_WBITS)
    assert explicit.how == "inflated" and not explicit.lossy
    implicit = transcode(path, str(DeflatedExplicitVRLittleEndian), IMPLICIT, start)
    source = dcmread(path)
    assert np.array_equal(decoded(implicit.data, IMPLICIT).pixel_array, source.pixel_array)


def big_endian_file(path: Path) -> tuple[Path, np.ndarray]:
    """A signed 16-bit CT written in Explicit VR Big Endian, with an OW value in a sequence."""
    ds = make_image("CT", rows=4, cols=4)
    ds.PixelRepresentation = 1
    values = np.array([175, -20736, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 32767], np.int16)
    ds.PixelData = values.astype(">i2").tobytes()
    item = Dataset()
    item.LUTDescriptor = [2, 0, 16]
    item.LUTData = np.array([1, 258], ">u2").tobytes()
    item["LUTData"].VR = "OW"
    ds.ModalityLUTSequence = Sequence([item])
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path, values.reshape(4, 4)


@pytest.mark.parametrize("target", [EXPLICIT, IMPLICIT])
def test_big_endian_becomes_little_endian_with_words_swapped(tmp_path: Path, target: str) -> None:
    path, values = big_endian_file(tmp_path / "be.dcm")
    assert np.array_equal(dcmread(path).pixel_array, values)  # pydicom reads it right
    result = transcode(path, str(ExplicitVRBigEndian), target, data_start(path))
    out = decoded(result.data, target)
    assert np.array_equal(out.pixel_array, values)
    assert out.pixel_array[0, 0] == 175
    item = out.ModalityLUTSequence[0]
    assert list(item.LUTDescriptor) == [2, 0, 16]
    assert np.frombuffer(item.LUTData, "<u2").tolist() == [1, 258]
    assert out.SOPInstanceUID == dcmread(path).SOPInstanceUID


def test_rle_decompressed_with_identity_kept(tmp_path: Path) -> None:
    ds = make_image("CT", rows=8, cols=8)
    pixels = ds.pixel_array.copy()
    ds.compress(RLELossless, generate_instance_uid=False)
    path = save(ds, tmp_path / "rle.dcm")
    result = transcode(path, str(RLELossless), IMPLICIT, data_start(path))
    out = decoded(result.data, IMPLICIT)
    assert np.array_equal(out.pixel_array, pixels)
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    assert not result.lossy and "LossyImageCompression" not in out


def test_lossy_jpeg_decompressed_says_lossy(tmp_path: Path) -> None:
    path = Path(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
    result = transcode(path, str(JPEGBaseline8Bit), EXPLICIT, data_start(path))
    out = decoded(result.data, EXPLICIT)
    assert result.lossy and out.LossyImageCompression == "01"
    assert out.PhotometricInterpretation == "RGB"
    assert out.pixel_array.shape == (100, 100, 3)


def test_undecodable_pixel_data_is_refused(tmp_path: Path) -> None:
    ds = make_image("CT")
    ds.PixelData = encapsulate([b"\xff\xd8 not a jpeg \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    path = save(ds, tmp_path / "bad.dcm")
    with pytest.raises(TranscodeError, match="cannot be decoded"):
        transcode(path, str(JPEGBaseline8Bit), EXPLICIT, data_start(path))
    with pytest.raises(TranscodeError, match="cannot convert into"):
        transcode(path, str(JPEGBaseline8Bit), str(ExplicitVRBigEndian), data_start(path))


def test_category_rank_follows_send_order() -> None:
    order = ("IMAGES", "OTHER", "RTSTRUCT", "RTPLAN", "RTDOSE")
    ct = ObjectInfo(PurePosixPath("a"), "1.2.840.10008.5.1.4.1.1.2", "1", EXPLICIT, "CT")
    plan = ObjectInfo(PurePosixPath("b"), "1.2.840.10008.5.1.4.1.1.481.5", "2", EXPLICIT)
    record = ObjectInfo(PurePosixPath("c"), "1.2.840.10008.5.1.4.1.1.481.4", "3", EXPLICIT)
    assert category_rank(ct, order) == 0
    assert category_rank(plan, order) == 3
    assert category_rank(record, order) == len(order)  # not in the order: last


def test_retry_state_keeps_refusal_counts(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(RetryState("G", 1.0, 2, 3.0, "why", {"G/a.dcm": 2}))
    loaded = store.load("G")
    assert loaded is not None and loaded.refusals == {"G/a.dcm": 2}
    older = tmp_path / ".dicomnode-state"
    for path in older.glob("*.json"):  # a state file written before refusals existed
        path.write_text('{"group": "G", "first_failure": 1, "attempts": 1, "next_attempt": 2}')
    loaded = store.load("G")
    assert loaded is not None and loaded.refusals == {}

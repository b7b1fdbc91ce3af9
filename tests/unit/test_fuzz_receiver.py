"""Fuzz the receiver's parsing of bytes a peer controls: every input gets a clean status.

The store handler is driven exactly as pynetdicom drives it (an event whose
``dataset_path`` is the temp file: preamble, file meta, then the received data
set bytes), with random, truncated and bit-flipped data sets. Whatever the
bytes, the handler must return a defined C-STORE status, never raise, never
answer success for an object it did not file whole, and never leave a file it
answered a failure for under a final name.
"""

from __future__ import annotations

import struct
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

from dicomnode.config import ReceiverConfig
from dicomnode.integrity import MAX_DEPTH, find_defect
from dicomnode.receiver.store import ReceivedObject, StoreHandler
from tests.factories import make_image, rt_set
from tests.integration.rawpeer import encode_dataset

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
BIG = "1.2.840.10008.1.2.2"
STATUSES = {0x0000, 0xA700, 0xC000}

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def part10(payload: bytes, syntax: str = EXPLICIT, sop_uid: str = "1.2.3.4") -> bytes:
    """Return the temp file pynetdicom writes: preamble, DICM, file meta, received bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return bytes(fp.getvalue()) + payload


class Harness:
    """A StoreHandler on a temp destination, given received files as both transports do."""

    def __init__(self, root: Path) -> None:
        self.dest = root / "dest"
        self.tmp = self.dest / ".incoming-tmp"
        self.tmp.mkdir(parents=True)
        self.handler = StoreHandler(ReceiverConfig(destination_dir=self.dest, min_free_space_mb=0))
        self.count = 0

    def store(self, file_bytes: bytes) -> int:
        self.count += 1
        path = self.tmp / f"fuzz{self.count}.dcm"
        path.write_bytes(file_bytes)
        with warnings.catch_warnings():
            # pydicom warns about odd values; in production these are log lines.
            warnings.simplefilter("ignore")
            status = self.handler.finish(
                ReceivedObject(path, "FUZZER", "127.0.0.1:1", time.monotonic(), "1.2.3.4")
            ).status
        path.unlink(missing_ok=True)
        return status

    def filed(self) -> list[Path]:
        incoming = self.dest / "incoming"
        return sorted(incoming.rglob("*.dcm")) if incoming.exists() else []

    def reset(self) -> None:
        for path in self.filed():
            path.unlink()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    yield Harness(tmp_path)


def _assert_clean(harness: Harness, status: int, payload: bytes) -> None:
    assert status in STATUSES, f"0x{status:04X}"
    filed = harness.filed()
    if status == 0x0000:
        assert len(filed) == 1
        data = filed[0].read_bytes()
        assert data.endswith(payload), "stored bytes differ from the received data set"
        assert find_defect(filed[0]) is None
    else:
        assert filed == [], f"failure 0x{status:04X} but a file was filed: {filed}"
    harness.reset()


VALID = encode_dataset(make_image(rows=8, cols=8))
VALID_IMPLICIT = encode_dataset(make_image(rows=8, cols=8), implicit=True)
RT_PLAN = encode_dataset(rt_set()["rtplan"], implicit=True)  # nested sequences


@FUZZ
@given(payload=st.binary(max_size=3000), syntax=st.sampled_from([EXPLICIT, IMPLICIT, BIG]))
def test_fuzz_random_data_set_bytes_get_a_clean_status(
    harness: Harness, payload: bytes, syntax: str
) -> None:
    _assert_clean(harness, harness.store(part10(payload, syntax)), payload)


@FUZZ
@given(data=st.data())
def test_fuzz_truncated_objects_are_never_filed_as_success_when_cut_inside_an_element(
    harness: Harness, data: st.DataObject
) -> None:
    payload, syntax = data.draw(
        st.sampled_from([(VALID, EXPLICIT), (VALID_IMPLICIT, IMPLICIT), (RT_PLAN, IMPLICIT)])
    )
    cut = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
    status = harness.store(part10(payload[:cut], syntax))
    _assert_clean(harness, status, payload[:cut])
    pixel_tag = payload.find(b"\xe0\x7f\x10\x00")
    if pixel_tag != -1 and pixel_tag < cut:
        assert status == 0xC000, f"cut at {cut} inside the pixel data was answered 0x{status:04X}"


@FUZZ
@given(data=st.data())
def test_fuzz_bit_flipped_objects_get_a_clean_status(harness: Harness, data: st.DataObject) -> None:
    original, syntax = data.draw(
        st.sampled_from([(VALID, EXPLICIT), (VALID_IMPLICIT, IMPLICIT), (RT_PLAN, IMPLICIT)])
    )
    payload = bytearray(original)
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(payload) - 1), st.integers(0, 255)), min_size=1, max_size=8
        )
    )
    for index, value in flips:
        payload[index] = value
    _assert_clean(harness, harness.store(part10(bytes(payload), syntax)), bytes(payload))


def test_fuzz_valid_objects_are_filed(harness: Harness) -> None:
    for payload, syntax in ((VALID, EXPLICIT), (VALID_IMPLICIT, IMPLICIT), (RT_PLAN, IMPLICIT)):
        status = harness.store(part10(payload, syntax))
        assert status == 0x0000
        _assert_clean(harness, status, payload)


@settings(max_examples=300, deadline=None)
@given(
    meta_and_body=st.binary(max_size=600),
    syntax=st.sampled_from([EXPLICIT, IMPLICIT, BIG, "1.2.840.10008.1.2.4.50"]),
)
def test_fuzz_find_defect_never_raises(
    tmp_path_factory: pytest.TempPathFactory, meta_and_body: bytes, syntax: str
) -> None:
    folder = tmp_path_factory.mktemp("defect", numbered=True)
    for content in (
        meta_and_body,
        part10(meta_and_body, syntax),
        b"\0" * 128 + b"DICM" + meta_and_body,
    ):
        path = folder / "x.dcm"
        path.write_bytes(content)
        result = find_defect(path)
        assert result is None or isinstance(result, str)


def test_fuzz_find_defect_refuses_absurd_nesting(tmp_path: Path) -> None:
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    seq = struct.pack("<HHL", 0x0008, 0x1115, 0xFFFFFFFF)  # implicit VR, undefined length
    body = (seq + item) * (MAX_DEPTH * 4)
    path = tmp_path / "deep.dcm"
    path.write_bytes(part10(body, IMPLICIT))
    reason = find_defect(path)
    assert reason is not None and "nested" in reason

"""Fuzz the forwarder's header inspection of files dropped into the watch folder.

Anything can land in a watch folder: random bytes, truncated or bit-flipped
objects, zero-byte files. :func:`~dicomnode.forwarder.header.inspect_file` must
answer every one with either the object's facts or a reason to park it, and
never raise (an exception would stall the whole group).
"""

from __future__ import annotations

import warnings
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.forwarder.batching import ObjectInfo
from dicomnode.forwarder.header import inspect_file
from dicomnode.forwarder.job import JobFile
from dicomnode.forwarder.outcome import ParkReason
from tests.factories import make_image, rt_set

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _file_bytes(implicit: bool, rt: bool) -> bytes:
    ds = rt_set()["rtplan"] if rt else make_image(rows=8, cols=8)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    fp = DicomBytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(fp, enforce_file_format=True)
    return bytes(fp.getvalue())


SAMPLES = [_file_bytes(False, False), _file_bytes(True, False), _file_bytes(True, True)]


def _inspect(path: Path, content: bytes) -> ObjectInfo | ParkReason:
    path.write_bytes(content)
    stat = path.stat()
    job = JobFile(path, path.name, PurePosixPath(path.name), stat.st_size, stat.st_mtime_ns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on odd values; the node logs them
        return inspect_file(job, PurePosixPath(path.name))


def _check(result: ObjectInfo | ParkReason) -> None:
    assert isinstance(result, (ObjectInfo, ParkReason))
    if isinstance(result, ParkReason):
        assert result.reason
    else:
        assert result.sop_class_uid and result.sop_instance_uid


@FUZZ
@given(content=st.binary(max_size=2000))
def test_fuzz_forwarder_random_files_are_parked_or_sent(tmp_path: Path, content: bytes) -> None:
    _check(_inspect(tmp_path / "random.dcm", content))


@FUZZ
@given(data=st.data())
def test_fuzz_forwarder_truncated_and_flipped_files_never_raise(
    tmp_path: Path, data: st.DataObject
) -> None:
    content = bytearray(data.draw(st.sampled_from(SAMPLES)))
    content = content[: data.draw(st.integers(0, len(content)))]
    for index in data.draw(st.lists(st.integers(0, max(len(content) - 1, 0)), max_size=6)):
        if content:
            content[index] ^= 0xFF
    _check(_inspect(tmp_path / "mutated.dcm", bytes(content)))


def test_fuzz_forwarder_zero_byte_and_text_files_are_parked(tmp_path: Path) -> None:
    for name, content in (("empty.dcm", b""), ("notes.txt", b"hello\n"), ("x.dcm", b"DICM")):
        result = _inspect(tmp_path / name, content)
        assert isinstance(result, ParkReason), name


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_fuzz_forwarder_whole_samples_are_sendable(tmp_path: Path, index: int) -> None:
    assert isinstance(_inspect(tmp_path / "ok.dcm", SAMPLES[index]), ObjectInfo)

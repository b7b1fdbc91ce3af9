"""Pure pieces of the defences before admission (issue 13): AE title rule, log escaping,
rate-limited refusals, bounded inflation of deflated data sets."""

from __future__ import annotations

import logging
import time
import tracemalloc
from pathlib import Path

import pytest

from dicomnode.config import ReceiverConfig
from dicomnode.dicomtags import HEADER_TAG_NUMBERS, header_from_elements, read_header, text_of
from dicomnode.dul.pdu import ae_text
from dicomnode.integrity import DeflatedDataSetError, examine, find_defect, read_header_bounded
from dicomnode.logsafe import escape, escape_message
from dicomnode.receiver import policy
from dicomnode.receiver.admission import RefusalLog
from dicomnode.receiver.policy import decide_association, is_valid_peer_ae
from tests.deflate_factory import save_deflated
from tests.factories import make_image

# --------------------------------------------------------------------------- AE titles


@pytest.mark.parametrize(
    "title", ["SEND\tER", "SENDER\r", "A\nB", "A\x0bB", "A\\B", "A\x00B", "ÄE", ""]
)
def test_preadmission_ae_with_control_chars_or_backslash_is_refused(title: str) -> None:
    cfg = ReceiverConfig(trusted_ae_titles=("*",))
    assert not is_valid_peer_ae(title)
    decision = decide_association(cfg, title, "NODE", frozenset({"127.0.0.1"}))
    assert not decision.accept
    assert decision.diagnostic == 0x03
    called = decide_association(cfg, "SENDER", title, frozenset({"127.0.0.1"}))
    assert not called.accept and called.diagnostic == 0x07


def test_preadmission_ae_fields_lose_only_space_padding() -> None:
    assert ae_text(b"  SENDER        ") == "SENDER"
    assert ae_text(b"SENDER\t         ") == "SENDER\t"  # kept, so admission refuses it
    assert ae_text(b"SENDER\x00\x00") == "SENDER"
    cfg = ReceiverConfig(trusted_ae_titles=("SENDER",))
    assert not decide_association(cfg, ae_text(b"SENDER\t        "), "N", frozenset()).accept
    assert decide_association(cfg, ae_text(b"SENDER          "), "N", frozenset()).accept


def test_preadmission_ae_mapping_and_hosts_match_exactly(tmp_path: Path) -> None:
    bound = tmp_path / "bound"
    cfg = ReceiverConfig(
        destination_dir=tmp_path,
        trusted_ae_titles=("*",),
        ae_mappings=(("BOUND", bound),),
        ae_hosts=(("BOUND", ("10.9.9.9",)),),
    )
    assert policy.route_for(cfg, "BOUND") == bound
    assert policy.route_for(cfg, "bound") == tmp_path / "incoming"  # no case-insensitive fallback
    assert policy.hosts_for(cfg, "bound") is None
    peer = frozenset({"127.0.0.1"})
    assert not decide_association(cfg, "BOUND", "N", peer).accept
    trusted = ReceiverConfig(trusted_ae_titles=("SENDER",))
    assert not decide_association(trusted, "sender", "N", peer).accept


# --------------------------------------------------------------------------- log escaping


def test_preadmission_escape_makes_one_printable_line() -> None:
    assert escape("SENDER") == "SENDER"
    assert escape("1.2.840.10008") == "1.2.840.10008"
    assert escape("A\nFORGED") == "A\\x0aFORGED"
    assert escape("A\r\tB\x0b\x1b[31m") == "A\\x0d\\x09B\\x0b\\x1b[31m"
    assert escape("X\u2028Y\u0085Z") == "X\\u2028Y\\x85Z"
    assert escape("C:\\dir") == "C:\\\\dir"  # a backslash cannot fake an escape
    assert escape("Müller^Jörg") == "Müller^Jörg"
    for forged in ("a\nb", "a\rb", "a\u2029b", "a\x00b"):
        assert escape(forged).isprintable()
        assert len(escape(forged).splitlines()) == 1
    assert escape_message("path C:\\x line\nnext") == "path C:\\x line\\x0anext"


def test_preadmission_log_formatter_keeps_each_record_on_one_line() -> None:
    from dicomnode.logsetup import OneLineFormatter

    record = logging.LogRecord(
        "x", logging.INFO, "", 0, "STORED calling_ae=%s", ("A\nFORGED",), None
    )
    line = OneLineFormatter("%(message)s").format(record)
    assert line == "STORED calling_ae=A\\x0aFORGED"


# --------------------------------------------------------------------------- refusal lines


def test_preadmission_refusals_are_logged_once_per_peer_and_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RefusalLog(60.0)
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        for _ in range(500):
            log.warning("10.0.0.1", "untrusted", "REJECTED association peer=%s", "10.0.0.1")
        log.warning("10.0.0.2", "untrusted", "REJECTED association peer=%s", "10.0.0.2")
        log.warning("10.0.0.1", "timeout", "ABORTED connection peer=%s", "10.0.0.1")
        log.flush()  # the interval has not passed: nothing more yet
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "REJECTED association peer=10.0.0.1",
        "REJECTED association peer=10.0.0.2",
        "ABORTED connection peer=10.0.0.1",
    ]


def test_preadmission_suppressed_refusals_are_counted_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RefusalLog(0.05)
    with caplog.at_level(logging.WARNING, logger="dicomnode"):
        for _ in range(40):
            log.warning("10.0.0.1", "untrusted", "REJECTED association peer=%s", "10.0.0.1")
        deadline = time.monotonic() + 5
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            log.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "REJECTED association peer=10.0.0.1"
    assert "REJECTED 39 more connection(s) from peer 10.0.0.1" in lines[1]


# --------------------------------------------------------------------------- deflate


def test_preadmission_deflated_header_read_without_inflating_everything(tmp_path: Path) -> None:
    ds = make_image("CT")
    path = save_deflated(ds, 20 * 1024 * 1024, tmp_path / "big.dcm")  # 20 MB of zeros
    tracemalloc.start()
    try:
        exam = examine(path, HEADER_TAG_NUMBERS)
        header = read_header_bounded(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exam.defect is None and exam.deflated
    assert text_of(header_from_elements(exam.elements, False, True), "SOPInstanceUID") == str(
        ds.SOPInstanceUID
    )
    assert text_of(header, "SOPInstanceUID") == str(ds.SOPInstanceUID)
    assert text_of(header.file_meta, "TransferSyntaxUID") == "1.2.840.10008.1.2.1.99"
    assert peak < 12 * 1024 * 1024, f"peak {peak} bytes while reading a deflated header"


def test_preadmission_deflate_bomb_is_a_defect_with_flat_memory(tmp_path: Path) -> None:
    path = save_deflated(make_image("CT"), 400 * 1024 * 1024, tmp_path / "bomb.dcm")
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        defect = find_defect(path)
        with pytest.raises(DeflatedDataSetError, match="deflate bomb"):
            read_header_bounded(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert defect is not None and "deflate bomb" in defect
    assert peak < 12 * 1024 * 1024, f"peak {peak} bytes while judging a deflate bomb"


def test_preadmission_cut_off_deflated_stream_is_a_defect(tmp_path: Path) -> None:
    path = save_deflated(make_image("CT"), 100_000, tmp_path / "whole.dcm")
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 40])
    assert find_defect(path) is None
    assert find_defect(cut) is not None
    assert text_of(read_header(path), "SOPInstanceUID") == text_of(
        read_header_bounded(path), "SOPInstanceUID"
    )


def test_preadmission_forwarder_parks_a_deflate_bomb_without_inflating_it(tmp_path: Path) -> None:
    from pathlib import PurePosixPath

    from dicomnode.forwarder.header import inspect_file
    from dicomnode.forwarder.job import JobFile
    from dicomnode.forwarder.outcome import ParkReason

    path = save_deflated(make_image("CT"), 400 * 1024 * 1024, tmp_path / "g" / "bomb.dcm")
    st = path.stat()
    job = JobFile(path, "g/bomb.dcm", PurePosixPath("bomb.dcm"), st.st_size, st.st_mtime_ns)
    tracemalloc.start()
    try:
        verdict = inspect_file(job, PurePosixPath("g/bomb.dcm"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(verdict, ParkReason)
    assert "deflate bomb" in verdict.reason
    assert peak < 12 * 1024 * 1024, f"peak {peak} bytes while the forwarder read a bomb's header"
    fine = save_deflated(make_image("CT"), 1000, tmp_path / "g" / "fine.dcm")
    st = fine.stat()
    job = JobFile(fine, "g/fine.dcm", PurePosixPath("fine.dcm"), st.st_size, st.st_mtime_ns)
    assert not isinstance(inspect_file(job, PurePosixPath("g/fine.dcm")), ParkReason)


# --------------------------------------------------------------------------- stale files


def test_preadmission_stale_part_files_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import os

    from dicomnode.storage import clean_stale_parts, part_path

    final = tmp_path / "ae" / "PAT" / "STUDY" / "CT_1.dcm"
    final.parent.mkdir(parents=True)
    stale = part_path(final)
    stale.write_bytes(b"half a copy")
    os.utime(stale, (1_000_000, 1_000_000))
    live = part_path(final)
    live.write_bytes(b"being copied now")
    kept = final.parent / "notes.part"  # not a name part_path gives: never touched
    kept.write_bytes(b"x")
    os.utime(kept, (1_000_000, 1_000_000))
    hidden = tmp_path / "ae" / ".convert-pending"
    hidden.mkdir()
    inside_hidden = part_path(hidden / "x.dcm")
    inside_hidden.write_bytes(b"x")
    os.utime(inside_hidden, (1_000_000, 1_000_000))
    assert clean_stale_parts([tmp_path / "ae", tmp_path / "missing"], time.time() - 60) == 1
    assert not stale.exists()
    assert live.exists() and kept.exists() and inside_hidden.exists()


def test_preadmission_worker_temp_files_are_cleaned_by_prefix(tmp_path: Path) -> None:
    from dicomnode.storage import clean_stale_temp, worker_temp_prefix

    mine = tmp_path / f"{worker_temp_prefix(1)}abc.dcm"
    other = tmp_path / f"{worker_temp_prefix(0)}def.dcm"
    other11 = tmp_path / f"{worker_temp_prefix(11)}ghi.dcm"
    for path in (mine, other, other11):
        path.write_bytes(b"partial")
    assert clean_stale_temp(tmp_path, worker_temp_prefix(1)) == 1
    assert not mine.exists() and other.exists() and other11.exists()
    assert clean_stale_temp(tmp_path) == 2

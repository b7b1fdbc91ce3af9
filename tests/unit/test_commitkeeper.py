"""The forwarder's storage commitment keeper on disk (issue 17): hold, record, apply, recover.

No sockets and no threads: the keeper's file handling is called directly on a
temporary watch folder (the network exchange is covered by
tests/integration/test_forward_commitment.py).
"""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

from dicomnode.awaiting import Report, held_folder, load_records, write_report
from dicomnode.config import COMMITMENT_STORE_NAME, DestinationConfig, ForwarderConfig
from dicomnode.forwarder.batching import ObjectInfo
from dicomnode.forwarder.commitkeeper import CommitmentKeeper
from dicomnode.forwarder.deliveries import DeliveryStore, FileIdentity
from dicomnode.forwarder.fanout import DeliveryState
from dicomnode.forwarder.holding import unclaimed_batches
from dicomnode.forwarder.job import JobFile

CT = "1.2.840.10008.5.1.4.1.1.2"


def _keeper(tmp_path: Path, max_attempts: int = 3) -> CommitmentKeeper:
    watch = tmp_path / "watch"
    watch.mkdir()
    dest = DestinationConfig(
        name="default",
        ae_title="DEST",
        host="127.0.0.1",
        port=104,
        storage_commitment=True,
        commitment_max_attempts=max_attempts,
    )
    return CommitmentKeeper(ForwarderConfig(watch_folder=watch), dest)


def _file(watch: Path, rel: str, body: bytes = b"data") -> JobFile:
    path = watch / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    st = path.stat()
    return JobFile(
        path, rel, PurePosixPath(*PurePosixPath(rel).parts[1:]), st.st_size, st.st_mtime_ns
    )


def _info(uid: str) -> ObjectInfo:
    return ObjectInfo(PurePosixPath("x"), CT, uid, "1.2.840.10008.1.2.1")


def _held_batch(keeper: CommitmentKeeper, count: int = 3) -> tuple[list[JobFile], str]:
    watch = keeper.config.watch_folder
    batch = keeper.open_batch("PAT")
    jobs = [_file(watch, f"PAT/s/{i}.dcm", bytes([i])) for i in range(count)]
    for i, jf in enumerate(jobs):
        assert batch.hold(jf, _info(f"1.{i}"))
    batch.close()
    return jobs, batch.key


def test_held_files_leave_the_watch_folder_and_the_record_is_written(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)
    _jobs, key = _held_batch(keeper)
    watch = keeper.config.watch_folder
    assert not (watch / "PAT").exists()  # moved, and the emptied folders removed
    (record,) = load_records(watch / COMMITMENT_STORE_NAME)
    assert record.batch == key and record.group == "PAT" and record.ae_title == "DEST"
    assert [(f.sop_instance, f.origin, f.sends, f.resend) for f in record.files] == [
        (f"1.{i}", f"PAT/s/{i}.dcm", 1, False) for i in range(3)
    ]
    assert (held_folder(watch / COMMITMENT_STORE_NAME, key) / "PAT/s/1.dcm").read_bytes() == b"\x01"
    assert keeper.awaiting() == {"default": 0}  # the count is refreshed by the thread
    keeper._refresh()
    assert keeper.awaiting() == {"default": 3}


def test_hold_without_move_links_and_leaves_the_file(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)
    watch = keeper.config.watch_folder
    batch = keeper.open_batch("PAT")
    jf = _file(watch, "PAT/a.dcm")
    assert batch.hold(jf, _info("1.1"), move=False)
    batch.close()
    assert jf.path.read_bytes() == b"data"
    assert (held_folder(watch / COMMITMENT_STORE_NAME, batch.key) / "PAT/a.dcm").exists()


def test_report_deletes_committed_flags_failed_and_parks_when_attempts_are_used(
    tmp_path: Path,
) -> None:
    keeper = _keeper(tmp_path, max_attempts=1)
    _jobs, key = _held_batch(keeper)
    watch = keeper.config.watch_folder
    store = watch / COMMITMENT_STORE_NAME
    (record,) = load_records(store)
    record = record.with_transaction("1.9")
    report = Report(key, "1.9", "DEST", "127.0.0.1:1", ((CT, "1.0"),), ((CT, "1.1", 0x0112),), 1.0)
    keeper._apply(record, report)
    # 1.0 committed: deleted; 1.1 failed and 1.2 left out, sent once = max: parked with the reason
    assert not list(store.glob("*.json"))
    assert not held_folder(store, key).exists()
    parked = sorted(p.name for p in (watch / "failed").rglob("*.dcm"))
    assert parked == ["1.dcm", "2.dcm"]
    log = (watch / "failed" / "send_errors.log").read_text()
    assert "0x0112 no such object instance" in log and "left out of its report" in log


def test_report_with_attempts_left_keeps_the_failed_for_sending_again(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path, max_attempts=3)
    _jobs, key = _held_batch(keeper)
    store = keeper.config.watch_folder / COMMITMENT_STORE_NAME
    (record,) = load_records(store)
    record = record.with_transaction("1.9")
    committed = ((CT, "1.0"), (CT, "1.2"))
    keeper._apply(record, Report(key, "1.9", "DEST", "p", committed, ((CT, "1.1", 0x0110),), 1.0))
    (left,) = load_records(store)
    assert [(f.sop_instance, f.resend, f.sends) for f in left.files] == [("1.1", True, 1)]
    assert left.transactions == () and left.requests == 0  # earlier transactions are closed
    assert [p.name for p in held_folder(store, key).rglob("*.dcm")] == ["1.dcm"]
    assert not (keeper.config.watch_folder / "failed").exists()


def test_batch_held_without_a_record_goes_back_to_the_watch_folder(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)
    watch = keeper.config.watch_folder
    batch = keeper.open_batch("PAT")
    for i in range(2):
        assert batch.hold(_file(watch, f"PAT/{i}.dcm"), _info(f"1.{i}"))
    # killed before close(): no record
    keeper.return_orphan(batch.key)
    assert sorted(p.name for p in (watch / "PAT").iterdir()) == ["0.dcm", "1.dcm"]
    assert not held_folder(watch / COMMITMENT_STORE_NAME, batch.key).exists()


def test_stale_report_to_a_closed_transaction_changes_nothing(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)
    _jobs, key = _held_batch(keeper)
    store = keeper.config.watch_folder / COMMITMENT_STORE_NAME
    write_report(store, Report(key, "1.404", "DEST", "p", ((CT, "1.0"),), (), time.time()))
    keeper._apply_reports()
    (record,) = load_records(store)
    assert len(record.files) == 3
    assert not list((store / "reports").glob("*.json"))


def test_batches_of_a_destination_no_longer_committing_are_reported(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)
    _held_batch(keeper, 2)
    watch = keeper.config.watch_folder
    assert unclaimed_batches(watch, {"default"}) == {}
    assert unclaimed_batches(watch, {"other"}) == {"default": 2}


def test_commitment_outcomes_reach_the_delivery_record(tmp_path: Path) -> None:
    # a file the destination did not commit must not count as delivered (duplicate window)
    keeper = _keeper(tmp_path, max_attempts=1)
    store = DeliveryStore(tmp_path / "deliveries.sqlite")
    keeper.deliveries = lambda: store
    watch = keeper.config.watch_folder
    batch = keeper.open_batch("PAT")
    idents = []
    for i in range(2):
        jf = _file(watch, f"PAT/{i}.dcm", bytes([i]))
        ident = FileIdentity(jf.display, jf.size, jf.mtime_ns, f"sum{i}", f"1.{i}")
        store.record("default", ident, DeliveryState.ACKNOWLEDGED, time.time())
        idents.append(ident)
        assert batch.hold(jf, _info(f"1.{i}"), checksum=f"sum{i}")
    batch.close()
    (record,) = load_records(watch / COMMITMENT_STORE_NAME)
    record = record.with_transaction("1.9")
    keeper._apply(record, Report(batch.key, "1.9", "DEST", "p", ((CT, "1.0"),), (), 1.0))
    assert store.states(idents[0]) == {"default": DeliveryState.COMMITTED}
    assert store.states(idents[1]) == {"default": DeliveryState.PENDING}  # sent again if retried
    assert store.last_acknowledged("default", "1.1", "sum1") is None
    assert store.last_acknowledged("default", "1.0", "sum0") is not None
    store.close()


def test_orphan_link_of_a_file_still_in_the_watch_folder_is_just_removed(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)
    watch = keeper.config.watch_folder
    batch = keeper.open_batch("PAT")
    jf = _file(watch, "PAT/a.dcm")
    assert batch.hold(jf, _info("1.1"), move=False)
    keeper.return_orphan(batch.key)
    assert [p.name for p in (watch / "PAT").iterdir()] == ["a.dcm"]
    assert not held_folder(watch / COMMITMENT_STORE_NAME, batch.key).exists()

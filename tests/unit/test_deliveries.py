"""The forwarder's per-destination progress record (SQLite file in a temporary folder)."""

from __future__ import annotations

from pathlib import Path

from dicomnode.forwarder.deliveries import DeliveryStore, FileIdentity
from dicomnode.forwarder.fanout import DeliveryState

FILE = FileIdentity(path="PAT1/a.dcm", size=10, mtime_ns=5, checksum="c1", sop_uid="1.2.3")


def test_deliveries_survive_a_new_connection_and_key_the_file_exactly(tmp_path: Path) -> None:
    store = DeliveryStore(tmp_path / "state" / "d.sqlite")
    store.record("A", FILE, DeliveryState.ACKNOWLEDGED, 100.0)
    store.record("B", FILE, DeliveryState.REFUSED, 101.0)
    # no close(): a killed process never closes
    again = DeliveryStore(tmp_path / "state" / "d.sqlite")
    assert again.states(FILE) == {"A": DeliveryState.ACKNOWLEDGED, "B": DeliveryState.REFUSED}
    dropped_again = FileIdentity("PAT1/a.dcm", 10, 6, "c1", "1.2.3")  # new mtime: a new file
    assert again.states(dropped_again) == {}
    # ...but the same object (UID + content) was acknowledged by A, not by B (refused)
    assert again.last_acknowledged("A", "1.2.3", "c1") == 100.0
    assert again.last_acknowledged("B", "1.2.3", "c1") is None
    assert again.last_acknowledged("A", "1.2.3", "other-content") is None
    store.close()
    again.close()


def test_deliveries_prune_only_rows_of_files_that_left(tmp_path: Path) -> None:
    watch = tmp_path / "watch"
    (watch / "PAT1").mkdir(parents=True)
    (watch / "PAT1" / "a.dcm").write_bytes(b"x")
    store = DeliveryStore(tmp_path / "d.sqlite")
    store.record("A", FILE, DeliveryState.ACKNOWLEDGED, 100.0)
    gone = FileIdentity("PAT1/b.dcm", 1, 1, "c2", "1.2.4")
    store.record("A", gone, DeliveryState.ACKNOWLEDGED, 100.0)
    recent = FileIdentity("PAT1/c.dcm", 1, 1, "c3", "1.2.5")
    store.record("A", recent, DeliveryState.ACKNOWLEDGED, 500.0)
    assert store.prune(200.0, watch) == 1
    assert store.states(FILE) and store.states(recent) and not store.states(gone)

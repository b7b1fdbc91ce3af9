"""The STORED line's ledger event, as the store handler attaches it (no network)."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest

from dicomnode.config import ReceiverConfig
from dicomnode.ledger.events import RECORD_ATTRIBUTE
from dicomnode.receiver.store import ReceivedObject, StoreHandler
from tests.factories import make_image, save


class _Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, RECORD_ATTRIBUTE, None)
        if event is not None:
            self.events.append(event)


@pytest.mark.parametrize("in_memory", [True, False])
def test_stored_event_carries_the_checksum_of_an_object_held_in_memory(
    tmp_path: Path, in_memory: bool
) -> None:
    """A small object's SHA-256 is taken from memory after the response, not read back.

    Without it (a large object) the ledger writer hashes the filed file itself.
    """
    dest = tmp_path / "dest"
    tmp = dest / ".incoming-tmp"
    tmp.mkdir(parents=True)
    ds = make_image()
    source = save(ds, tmp_path / "src.dcm")
    received = tmp / "object.part"
    received.write_bytes(source.read_bytes())
    handler = StoreHandler(ReceiverConfig(destination_dir=dest, min_free_space_mb=0))
    events = _Events()
    logger = logging.getLogger("dicomnode.receiver.store")
    logger.addHandler(events)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        filing = handler.finish(
            ReceivedObject(
                received,
                "SCANNER",
                "127.0.0.1:1",
                time.monotonic(),
                str(ds.SOPInstanceUID),
                content=source.read_bytes() if in_memory else None,
            ),
            defer_report=True,
        )
        assert filing.status == 0x0000
        assert events.events == []  # the line (and its checksum) only after the response
        for report in filing.reports:
            report()
    finally:
        logger.removeHandler(events)
        logger.setLevel(old_level)
    [event] = events.events
    filed = Path(str(event["path"]))
    assert filed.read_bytes() == source.read_bytes()
    if in_memory:
        assert event["checksum"] == hashlib.sha256(filed.read_bytes()).hexdigest()
    else:
        assert event["checksum"] is None

"""A logging handler that hands the ledger events carried by log records to the writer.

Attached to the ``dicomnode`` logger of the node's main process only. Records
without a ``ledger`` attribute are ignored; the handler never formats a message
and never blocks. Imports the standard library and :mod:`.writer`.
"""

from __future__ import annotations

import logging

from dicomnode.ledger.events import RECORD_ATTRIBUTE
from dicomnode.ledger.writer import LedgerWriter


class LedgerHandler(logging.Handler):
    """Queue the ``ledger`` event of each record on ``writer`` (time: the record's)."""

    def __init__(self, writer: LedgerWriter) -> None:
        super().__init__(logging.DEBUG)
        self.writer = writer

    def handle(self, record: logging.LogRecord) -> bool:
        """Queue the event without taking the handler lock (the writer's queue is thread-safe)."""
        event = getattr(record, RECORD_ATTRIBUTE, None)
        if isinstance(event, dict):
            self.writer.submit(event, record.created)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does it
        """Not used: :meth:`handle` queues the event directly."""

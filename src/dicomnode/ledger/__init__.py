"""The ledger: an embedded SQLite (WAL) record of every event of the node.

Receiver, conversion and forwarder code never write to the ledger themselves:
they attach an event to the log record of their fixed-verb line
(``extra=ledger_extra(...)``, see :mod:`.events`). In the node's main process a
logging handler (:mod:`.handler`) hands those events to one writer thread
(:mod:`.writer`) that stores them in batches. Receiver pool workers already send
their log records to the main process, so their events reach the same writer
without any other channel. The file system stays the source of truth: a lost or
corrupt ledger never stops receiving or forwarding, and at start-up objects found
on disk but not recorded get a ``recovered`` event. Reading is :mod:`.queries`.
Imports the standard library, :mod:`dicomnode.dicomtags` and :mod:`dicomnode.storage` only.
"""

from __future__ import annotations

from dicomnode.ledger.events import EventKind, ledger_extra

__all__ = ["EventKind", "ledger_extra"]

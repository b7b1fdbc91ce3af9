"""Storage commitment of a destination (SCU side): hold what it acknowledged until it commits it.

For a ``[Destination:NAME]`` with ``storage_commitment = true`` a file the
destination acknowledged is not deleted: :meth:`.holding.Batch.hold` moves it
(rename, same volume; a hard link, else a copy, when other destinations still
need the file) into the watch folder's hidden store (:mod:`dicomnode.awaiting`),
where the watcher never sees it, and :meth:`.holding.Batch.close` writes the
batch's record (fsynced) once the group's send ends. The keeper's thread then sends
the N-ACTION (a new Transaction UID; :func:`~.lean.request_commitment`), and
applies each report the receiver (or the N-ACTION's own association) kept in
the store: committed files are deleted, the others are sent again to this
destination alone, from where they are held, and asked for again or, after
``commitment_max_attempts`` sends, parked in ``failed/`` with the reason.
No report within ``commitment_timeout_s`` means the request is made again,
and the batch is parked after ``commitment_max_attempts`` unanswered
requests; a request that cannot be sent is retried with the forwarder's
backoff and parked after ``give_up_after_s`` (:mod:`.commitplan` decides).
Outcomes also go to the forwarder's delivery record. Everything is on disk,
so a restart resumes: records are reloaded, batches held without a record (a
kill before the record) go back to the watch folder (a held link
whose file is still there is just removed).

Log verbs: ``COMMIT-REQUESTED``, ``COMMITTED``, ``COMMIT-FAILED``,
``COMMIT-RESEND``, ``COMMIT-AWAITING`` (at start; all with ``role=scu``;
``QUARANTINED`` from parking).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import shutil
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Final

from pydicom.uid import generate_uid

from dicomnode.awaiting import (
    HELD_DIR,
    HeldFile,
    Record,
    Report,
    held_folder,
    load_record,
    load_records,
    pending_reports,
    record_path,
    save_record,
    write_report,
)
from dicomnode.config import COMMITMENT_STORE_NAME, DestinationConfig, ForwarderConfig
from dicomnode.dul.commitment import parse_event_info
from dicomnode.dul.link import LinkError
from dicomnode.forwarder.batching import ObjectInfo, backoff_delay_s, group_label
from dicomnode.forwarder.commitplan import ReportVerdict, Step, judge_report, next_step
from dicomnode.forwarder.deliveries import DeliveryStore, FileIdentity
from dicomnode.forwarder.delivery import send_group
from dicomnode.forwarder.fanout import DeliveryState
from dicomnode.forwarder.holding import Batch, inside_group, return_held
from dicomnode.forwarder.job import GroupJob, JobFile
from dicomnode.forwarder.lean import LeanAssociationSender, request_commitment
from dicomnode.forwarder.outcome import ParkReason, park_file, park_stamp, remove_empty_parents
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.logsafe import escape

logger = logging.getLogger(__name__)

#: How often the keeper looks for reports and due requests when nothing wakes it.
_TICK_S: Final = 0.5
#: How long the N-ACTION's association stays open for a report sent on it (less when the
#: report arrives on a new association meanwhile).
SAME_ASSOCIATION_WAIT_S: Final = 3.0


def _where(dest: DestinationConfig) -> str:
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


@dataclass(slots=True)
class _Tally:
    files: int = 0
    batches: int = 0


class CommitmentKeeper:
    """Holds acknowledged files of one committing destination until it commits them.

    Parameters
    ----------
    config : ForwarderConfig
        The forwarder's settings (watch folder, our AE, timeouts, retry policy);
        ``target_*`` are replaced by the destination's address.
    destination : DestinationConfig
        The committing destination (``storage_commitment = true``).
    ssl_context : ssl.SSLContext or None
        Client TLS context (as for sending).
    """

    def __init__(
        self,
        config: ForwarderConfig,
        destination: DestinationConfig,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.config = replace(
            config,
            target_aet=destination.ae_title,
            target_ip=destination.host,
            target_port=destination.port,
        )
        self.destination = destination
        self.ssl_context = ssl_context
        self.store = config.watch_folder / COMMITMENT_STORE_NAME
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._awaiting = _Tally()
        #: The forwarder's delivery record (set by the forwarder): commitment outcomes are
        #: recorded there, so a file not committed never counts as delivered (duplicates).
        self.deliveries: Callable[[], DeliveryStore | None] = lambda: None

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Return held batches without a record to the watch folder, then start the thread."""
        self.store.mkdir(parents=True, exist_ok=True)
        known = {r.batch for r in load_records(self.store)}
        with contextlib.suppress(FileNotFoundError):
            for folder in sorted((self.store / HELD_DIR).iterdir()):
                if folder.is_dir() and folder.name not in known:
                    self.return_orphan(folder.name)
        self._refresh()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dicomnode-commitment", daemon=True)
        self._thread.start()
        logger.info(
            "COMMIT-AWAITING role=scu destination=%s batches=%d files=%d (resumed from disk)",
            _where(self.destination),
            self._awaiting.batches,
            self._awaiting.files,
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; everything awaiting stays on disk for the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def wake(self) -> None:
        """Ask the thread to look at the store now."""
        self._wake.set()

    def open_batch(self, group: str) -> Batch:
        """Return a new batch for the files of ``group`` acknowledged in one send."""
        return Batch(self.store, self.config.watch_folder, self.destination, group, self.wake)

    def awaiting(self) -> dict[str, int]:
        """Return ``{destination name: files awaiting commitment}``."""
        with self._lock:
            return {self.destination.name: self._awaiting.files}

    def _refresh(self) -> list[Record]:
        records = [r for r in load_records(self.store) if r.destination == self.destination.name]
        with self._lock:
            self._awaiting = _Tally(sum(len(r.files) for r in records), len(records))
        return records

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._apply_reports()
                self._due(time.time())
            except Exception:
                logger.exception("COMMIT-FAILED role=scu keeper error (continuing)")
            self._wake.wait(_TICK_S)
            self._wake.clear()

    def _due(self, now: float) -> None:
        dest = self.destination
        for listed in self._refresh():
            if self._stop.is_set():
                return
            # read again: a report applied while handling an earlier batch may have settled it
            record = load_record(record_path(self.store, listed.batch))
            if record is None:
                continue
            now = max(now, time.time())
            step = next_step(
                record,
                now,
                dest.commitment_timeout_s,
                dest.commitment_max_attempts,
                self.config.give_up_after_s,
            )
            if step.at > now or step.step is Step.WAIT:
                continue
            if step.step is Step.PARK:
                self._park_batch(record, step.reason)
            elif step.step is Step.RESEND:
                self._resend(record)
            else:
                if step.reason and record.requests and not record.failures:
                    last = record.transactions[-1] if record.transactions else "-"
                    logger.warning(
                        "COMMIT-FAILED role=scu transaction_uid=%s destination=%s instances=%d "
                        "reason=%s (request %d of %d)",
                        last,
                        _where(dest),
                        len(record.files),
                        step.reason,
                        record.requests + 1,
                        dest.commitment_max_attempts,
                        extra=self._event(EventKind.COMMIT_FAILED, record, last, step.reason),
                    )
                    record = replace(record, first_silence=record.first_silence or now)
                self._request(record)
            self._apply_reports()

    def _event(
        self, kind: EventKind, record: Record, transaction: str, what: str, **more: object
    ) -> dict[str, object]:
        return ledger_extra(
            kind,
            calling_ae=self.config.calling_aet,
            peer=f"{record.host}:{record.port}",
            destination=_where(self.destination),
            size=len(record.files),
            reason=f"role=scu transaction {transaction}: {what}",
            **more,
        )

    # -- requesting -----------------------------------------------------------------

    def _request(self, record: Record) -> None:
        """Send an N-ACTION for ``record`` (its new Transaction UID kept on disk first)."""
        transaction = generate_uid()
        record = record.with_transaction(transaction)
        try:
            save_record(self.store, record)
        except OSError as exc:
            logger.error(
                "COMMIT-FAILED role=scu batch=%s: cannot update its record (%s); retried",
                record.batch,
                exc,
            )
            return
        sender = LeanAssociationSender(self.config, self.ssl_context)
        instances = [(f.sop_class, f.sop_instance) for f in record.files]
        accepted: list[bool] = []

        def on_accepted() -> None:
            accepted.append(True)
            self._log_requested(record, transaction)

        try:
            status = request_commitment(
                sender,
                transaction,
                instances,
                lambda event_type, data, syntax: self._report_here(
                    record, transaction, data, syntax
                ),
                SAME_ASSOCIATION_WAIT_S,
                lambda: any(
                    p.name.startswith(f"{record.batch}~") for p in pending_reports(self.store)
                ),
                on_accepted,
            )
            error = None if status == 0 else f"the N-ACTION was answered with status 0x{status:04X}"
        except LinkError as exc:
            # trouble after the N-ACTION-RSP said success (waiting for a report there) does not
            # undo the request: its report may still come, on a new association
            error = None if accepted else str(exc)
        now = time.time()
        latest = load_record(record_path(self.store, record.batch))
        if latest is None or transaction not in latest.transactions:
            return  # settled meanwhile
        if error is None:
            latest = replace(
                latest,
                requests=latest.requests + 1,
                requested_at=now,
                failures=0,
                first_failure=0.0,
                next_attempt=0.0,
                last_error="",
            )
        else:
            failures = latest.failures + 1
            delay = backoff_delay_s(
                failures, self.config.retry_initial_delay_s, self.config.retry_max_delay_s
            )
            latest = replace(
                latest,
                failures=failures,
                first_failure=latest.first_failure or now,
                next_attempt=now + delay,
                last_error=error,
            )
            logger.warning(
                "COMMIT-FAILED role=scu transaction_uid=%s destination=%s instances=%d "
                "attempt=%d retry_in=%gs reason=%s",
                transaction,
                _where(self.destination),
                len(record.files),
                failures,
                delay,
                escape(error),
                extra=self._event(
                    EventKind.RETRIED, record, transaction, f"request failed: {error}"
                ),
            )
        try:
            save_record(self.store, latest)
        except OSError as exc:
            logger.error(
                "COMMIT-FAILED role=scu batch=%s: record not updated: %s", latest.batch, exc
            )

    def _log_requested(self, record: Record, transaction: str) -> None:
        logger.info(
            "COMMIT-REQUESTED role=scu transaction_uid=%s destination=%s instances=%d "
            "request=%d/%d group=%s",
            transaction,
            _where(self.destination),
            len(record.files),
            record.requests + 1,
            self.destination.commitment_max_attempts,
            group_label(record.group),
            extra=self._event(EventKind.COMMIT_REQUESTED, record, transaction, "request accepted"),
        )

    def _report_here(self, record: Record, transaction: str, data: bytes, syntax: str) -> int:
        """Keep a report that came on the N-ACTION's association; return the RSP status."""
        try:
            info = parse_event_info(data, syntax)
        except ValueError as exc:
            logger.warning(
                "COMMIT-FAILED role=scu destination=%s reason=report refused: %s",
                _where(self.destination),
                escape(str(exc)),
            )
            return 0x0115
        if info.transaction_uid not in record.transactions:
            logger.warning(
                "COMMIT-FAILED role=scu transaction_uid=%s destination=%s reason=report refused: "
                "unknown transaction",
                escape(info.transaction_uid),
                _where(self.destination),
            )
            return 0x0115
        report = Report(
            record.batch,
            info.transaction_uid,
            record.ae_title,
            f"{record.host}:{record.port}",
            info.committed,
            info.failed,
            time.time(),
            "same-association",
        )
        try:
            write_report(self.store, report)
        except OSError as exc:
            logger.error("COMMIT-FAILED role=scu report not kept: %s", exc)
            return 0x0110
        return 0x0000  # applied by the keeper's loop once the association is released

    # -- applying reports ---------------------------------------------------------------

    def _apply_reports(self) -> None:
        for path in pending_reports(self.store):
            batch = path.name.split("~", 1)[0]
            record = load_record(record_path(self.store, batch))
            if record is not None and record.destination != self.destination.name:
                continue  # another keeper's
            try:
                report = Report.from_json(json.loads(path.read_text("utf-8")))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.error("COMMIT-FAILED role=scu unreadable report %s: %s", path, exc)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if record is not None and report.transaction_uid in record.transactions:
                self._apply(record, report)
            elif record is not None:
                logger.info(
                    "COMMIT-FAILED role=scu transaction_uid=%s destination=%s: report to a "
                    "request already settled; ignored",
                    escape(report.transaction_uid),
                    _where(self.destination),
                )
            with contextlib.suppress(OSError):
                path.unlink()

    def _apply(self, record: Record, report: Report) -> None:
        dest = self.destination
        verdict = judge_report(
            record, report.committed, report.failed, dest.commitment_max_attempts
        )
        for held in verdict.committed:
            path = self.store / held.held
            with contextlib.suppress(OSError):
                path.unlink()
                remove_empty_parents(path, self.store)
            self._mark(held, DeliveryState.COMMITTED)
        if verdict.park:
            stamp = park_stamp(time.time())
            for held, why in verdict.park:
                self._park_file(record, held, why, stamp)
        self._log_report(record, report, verdict)
        for held, why in verdict.resend:
            logger.warning(
                "COMMIT-RESEND role=scu destination=%s file=%s sop_instance_uid=%s send=%d/%d "
                "reason=%s",
                _where(dest),
                held.origin,
                held.sop_instance,
                held.sends + 1,
                dest.commitment_max_attempts,
                why,
                extra=ledger_extra(
                    EventKind.RETRIED,
                    sop_uid=held.sop_instance,
                    path=str(self.store / held.held),
                    destination=_where(dest),
                    reason=f"role=scu {why}; sent again",
                ),
            )
        if not verdict.resend:
            self._forget(record)
            return
        # what is left is sent again, then asked for anew; older transactions are closed
        left = tuple(replace(held, resend=True) for held, _ in verdict.resend)
        self._save(
            replace(
                record,
                files=left,
                transactions=(),
                requests=0,
                requested_at=0.0,
                failures=0,
                first_failure=0.0,
                next_attempt=0.0,
                last_error="",
                first_silence=0.0,
            )
        )

    def _save(self, record: Record) -> None:
        try:
            save_record(self.store, record)
        except OSError as exc:
            logger.error(
                "COMMIT-FAILED role=scu batch=%s: record not updated: %s", record.batch, exc
            )
        self._refresh()

    def _log_report(self, record: Record, report: Report, verdict: ReportVerdict) -> None:
        where = _where(self.destination)
        if not verdict.failed:
            logger.info(
                "COMMITTED role=scu transaction_uid=%s destination=%s peer=%s committed=%d "
                "failed=0 reply=%s group=%s",
                escape(report.transaction_uid),
                where,
                report.peer,
                len(verdict.committed),
                report.how,
                group_label(record.group),
                extra=self._event(
                    EventKind.COMMITTED,
                    record,
                    report.transaction_uid,
                    f"all {len(verdict.committed)} committed; files deleted",
                    status=f"committed={len(verdict.committed)} failed=0",
                ),
            )
            return
        reasons = collections.Counter(
            f"0x{r:04X}" for _, _, r in report.failed
        ) or collections.Counter({"left-out": verdict.failed})
        logger.warning(
            "COMMIT-FAILED role=scu transaction_uid=%s destination=%s peer=%s committed=%d "
            "failed=%d resend=%d parked=%d reasons=%s reply=%s group=%s",
            escape(report.transaction_uid),
            where,
            report.peer,
            len(verdict.committed),
            verdict.failed,
            len(verdict.resend),
            len(verdict.park),
            ",".join(f"{k}:{v}" for k, v in sorted(reasons.items())),
            report.how,
            group_label(record.group),
            extra=self._event(
                EventKind.COMMIT_FAILED,
                record,
                report.transaction_uid,
                f"{verdict.failed} not committed: {len(verdict.resend)} sent again, "
                f"{len(verdict.park)} parked",
                status=f"committed={len(verdict.committed)} failed={verdict.failed}",
            ),
        )

    def _resend(self, record: Record) -> None:
        """Send the files the destination did not commit again, from where they are held."""
        dest = self.destination
        files = []
        for held in record.files:
            if not held.resend:
                continue
            path = self.store / held.held
            try:
                st = path.stat()
            except OSError:
                continue
            origin = PurePosixPath(held.origin)
            files.append(
                JobFile(
                    path,
                    held.origin,
                    inside_group(record.group, origin),
                    st.st_size,
                    st.st_mtime_ns,
                )
            )
        job = GroupJob(record.group, tuple(files), self.config.watch_folder, self.store)
        applier = _HeldApplier(job)
        result = send_group(
            job,
            self.config,
            LeanAssociationSender(self.config, self.ssl_context),
            self._stop.is_set,
            apply=applier,
            name=dest.name,
        )
        kept: list[HeldFile] = []
        for held in record.files:
            path = self.store / held.held
            if not held.resend:
                kept.append(held)
            elif path in applier.sent:
                kept.append(replace(held, resend=False, sends=held.sends + 1))
            elif path.exists():
                kept.append(held)  # not sent this time (network trouble): tried again
            else:
                self._mark(held, DeliveryState.PENDING)  # refused when sent again: parked
        record = replace(record, files=tuple(kept))
        if not kept:
            self._forget(record)
            return
        error = result.network_error
        if error is None and any(f.resend for f in kept):
            error = "not every file could be sent again"
        if error is None:
            self._save(replace(record, failures=0, first_failure=0.0, next_attempt=0.0))
            return
        now = time.time()
        failures = record.failures + 1
        delay = backoff_delay_s(
            failures, self.config.retry_initial_delay_s, self.config.retry_max_delay_s
        )
        logger.warning(
            "COMMIT-FAILED role=scu destination=%s files=%d attempt=%d retry_in=%gs "
            "reason=sending again failed: %s",
            _where(dest),
            sum(1 for f in kept if f.resend),
            failures,
            delay,
            escape(error),
        )
        self._save(
            replace(
                record,
                failures=failures,
                first_failure=record.first_failure or now,
                next_attempt=now + delay,
                last_error=f"sending again failed: {error}",
            )
        )

    def _park_file(self, record: Record, held: HeldFile, why: str, stamp: str) -> None:
        park_file(
            self.store / held.held,
            park_root=self.config.watch_folder,
            group=record.group,
            inside=inside_group(record.group, PurePosixPath(held.origin)),
            display=held.origin,
            stamp=stamp,
            why=ParkReason(None, why, held.sop_instance),
            wall_time=time.time(),
            prune_root=self.store,
        )
        self._mark(held, DeliveryState.PENDING)

    def _mark(self, held: HeldFile, state: DeliveryState) -> None:
        """Record a commitment outcome in the delivery record.

        Committed: ``committed``. Parked because it was not committed: ``pending``
        again, so it never counts as delivered (no duplicate skipping), and a copy
        moved back from failed/ (same path, size and time) is sent to it again.
        """
        store = self.deliveries()
        if store is None or not held.checksum:
            return
        ident = FileIdentity(
            held.origin, held.size, held.mtime_ns, held.checksum, held.sop_instance
        )
        try:
            store.record(self.destination.name, ident, state, time.time())
        except sqlite3.Error as exc:
            logger.error(
                "STATE-WRITE-FAILED file=%s destination=%s: %s",
                held.origin,
                self.destination.name,
                exc,
            )

    def _park_batch(self, record: Record, reason: str) -> None:
        stamp = park_stamp(time.time())
        last = record.transactions[-1] if record.transactions else "-"
        logger.error(
            "COMMIT-FAILED role=scu transaction_uid=%s destination=%s instances=%d parked=%d "
            "reason=%s",
            last,
            _where(self.destination),
            len(record.files),
            len(record.files),
            escape(reason),
            extra=self._event(EventKind.COMMIT_FAILED, record, last, f"parked: {reason}"),
        )
        for held in record.files:
            if (self.store / held.held).exists():
                self._park_file(record, held, reason, stamp)
        self._forget(record)

    def _forget(self, record: Record) -> None:
        with contextlib.suppress(OSError):
            record_path(self.store, record.batch).unlink()
        folder = held_folder(self.store, record.batch)
        if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
        self._refresh()

    def return_orphan(self, batch: str) -> None:
        """Return the files of a batch held without a record to the watch folder."""
        return_held(self.store, self.config.watch_folder, batch)


class _HeldApplier:
    """Outcomes of sending held files again: remember what was acknowledged, park what was refused."""

    def __init__(self, job: GroupJob) -> None:
        self.job = job
        self.sent: set[Path] = set()

    def delivered(self, jf: JobFile, obj: ObjectInfo) -> Path | None:
        """Keep the file where it is held (the next request asks for it); nothing to prune."""
        self.sent.add(jf.path)
        return None

    def refused(self, jf: JobFile, why: ParkReason, stamp: str) -> bool:
        """Park the file in ``failed/`` with a ``send_errors.log`` line."""
        return (
            park_file(
                jf.path,
                park_root=self.job.park_root,
                group=self.job.key,
                inside=jf.inside,
                display=jf.display,
                stamp=stamp,
                why=why,
                wall_time=time.time(),
                prune_root=self.job.prune_root,
            )
            is not None
        )

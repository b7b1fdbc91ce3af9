"""Storage Commitment Push Model SCP: check what the node holds, keep and deliver the reports.

The file system is the source of truth. An instance is committed when a file
named ``<MODALITY>_<SOPInstanceUID>.dcm`` is in place below an AE folder and
its header names that SOP Instance and SOP Class. The file is found through
a small in-memory index of what this process filed (fed by the store handler),
else by one bounded walk of the requester's AE folder (:data:`WALK_LIMIT_S`).
A missing instance fails with 0x0112 (no such object instance), another class
with 0x0119 (class/instance conflict), an unreadable file with 0x0110.

A request is written to ``<destination_dir>/.storage-commitment/`` (one JSON
file per transaction, atomically, before the N-ACTION-RSP) and removed once
its N-EVENT-REPORT was answered. Reports the requester's own association
could not carry go on a new association to the ``[Destination:NAME]`` whose
``ae_title`` is the calling AE, retried with growing delays
(:func:`~.commitment.retry_delay`). At start the files a previous run left
become ``orphan-*`` (:func:`~dicomnode.receiver.startup.orphan_pending`) and any process of the node claims
each one by renaming it (atomic: one process wins), so pending reports
survive a restart, also with a pool of receiver processes.

Log verbs: ``COMMIT-REQUESTED``, ``COMMITTED``, ``COMMIT-FAILED``, ``COMMIT-DEFERRED``.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.config import DestinationConfig, ReceiverConfig, destination_for
from dicomnode.dicomtags import safe_component
from dicomnode.dul.dimse import (
    COMMAND_FIELD,
    N_EVENT_REPORT_RSP,
    STATUS,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_SOP_CLASS,
    command_us,
    n_event_report_rq,
    parse_command,
)
from dicomnode.dul.link import LinkError, LinkTimeout, PduLink
from dicomnode.dul.pdu import (
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ_PDU,
    ACCEPTANCE,
    APPLICATION_CONTEXT,
    PDV_COMMAND,
    PDV_LAST,
    PduType,
    ProposedContext,
    RoleSelection,
    iter_pdvs,
    p_data_tf,
)
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.logsafe import escape
from dicomnode.receiver.commitment import (
    CLASS_INSTANCE_CONFLICT,
    GIVE_UP_S,
    INVALID_ARGUMENT,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
    ActionRequest,
    Commitment,
    Reference,
    encode_report,
    fragments,
    judge_action,
    parse_action,
    retry_delay,
)
from dicomnode.receiver.policy import route_for
from dicomnode.receiver.startup import ORPHAN_PREFIX, PENDING_DIR
from dicomnode.storage import write_bytes_atomic

logger = logging.getLogger(__name__)

#: Longest walk of an AE folder looking for instances the index does not know.
WALK_LIMIT_S: Final = 60.0
#: Instances remembered by the in-memory index (per process).
INDEX_SIZE: Final = 200_000
#: How often the retrier looks for orphaned reports of other processes.
_SCAN_S: Final = 30.0


def _candidates(uid: str) -> str:
    return safe_component(uid, "NOUID", 64)


def _file_key(name: str) -> list[str]:
    """Return the possible SOP Instance UID parts of a file name ``<prefix>_<uid>.dcm``."""
    if not name.endswith(".dcm"):
        return []
    stem = name[:-4]
    return [stem[i + 1 :] for i, ch in enumerate(stem) if ch == "_"]


def _event(kind: EventKind, commitment: Commitment, what: str, how: str = "") -> dict[str, object]:
    """Return the ledger event of a storage commitment log line."""
    return ledger_extra(
        kind,
        calling_ae=commitment.calling,
        peer=commitment.peer,
        status=f"committed={len(commitment.committed)} failed={len(commitment.failed)}"
        if commitment.checked
        else f"instances={len(commitment.requested)}",
        reason=f"transaction {commitment.transaction_uid}: {what}",
        destination=how or None,
    )


@dataclass(slots=True)
class _Pending:
    commitment: Commitment
    path: Path
    attempts: int = 0
    due: float = 0.0


class Committer:
    """Checks commitment requests and delivers their reports (one per receiver process).

    Parameters
    ----------
    cfg : ReceiverConfig
        Receiver settings (destination, AE folders, ``[Destination:NAME]`` sections).
    owner : str
        Name prefix of this process's pending files (its temp prefix).
    """

    def __init__(self, cfg: ReceiverConfig, owner: str = "") -> None:
        self.cfg = cfg
        self.owner = owner
        self.folder = cfg.destination_dir / PENDING_DIR
        self._index: collections.OrderedDict[str, Path] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._queue: dict[str, _Pending] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._message_id = 0

    # ----------------------------------------------------------------- index

    def record_stored(self, sop_instance_uid: str, path: Path) -> None:
        """Remember where an instance was filed (called by the store handler)."""
        with self._lock:
            self._index[sop_instance_uid] = path
            self._index.move_to_end(sop_instance_uid)
            while len(self._index) > INDEX_SIZE:
                self._index.popitem(last=False)

    # ----------------------------------------------------------------- checking

    def check(self, commitment: Commitment) -> Commitment:
        """Return ``commitment`` with each requested instance committed or failed (reads files)."""
        found: dict[str, Path] = {}
        with self._lock:
            for ref in commitment.requested:
                path = self._index.get(ref.sop_instance)
                if path is not None:
                    found[ref.sop_instance] = path
        missing = {_candidates(r.sop_instance): r.sop_instance for r in commitment.requested}
        for uid in found:
            missing.pop(_candidates(uid), None)
        if missing:
            found.update(self._walk(route_for(self.cfg, commitment.calling), missing))
        committed: list[Reference] = []
        failed: list[tuple[Reference, int]] = []
        for ref in commitment.requested:
            reason = self._verify(found.get(ref.sop_instance), ref)
            if reason is None:
                committed.append(ref)
            else:
                failed.append((ref, reason))
        return replace(commitment, committed=tuple(committed), failed=tuple(failed), checked=True)

    @staticmethod
    def _walk(root: Path, wanted: dict[str, str]) -> dict[str, Path]:
        """Find files named ``*_<uid>.dcm`` below ``root`` (hidden folders skipped; time-bounded)."""
        out: dict[str, Path] = {}
        deadline = time.monotonic() + WALK_LIMIT_S
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                for key in _file_key(name):
                    uid = wanted.pop(key, None)
                    if uid is not None:
                        out[uid] = Path(folder) / name
            if not wanted:
                break
            if time.monotonic() > deadline:
                logger.warning(
                    "COMMIT-DEFERRED walk of %s stopped after %g s; %d instances not found",
                    root,
                    WALK_LIMIT_S,
                    len(wanted),
                )
                break
        return out

    @staticmethod
    def _verify(path: Path | None, ref: Reference) -> int | None:
        """Return None when ``path`` holds ``ref``, else the Failure Reason."""
        if path is None:
            return NO_SUCH_OBJECT_INSTANCE
        try:
            ds = dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=[(0x0008, 0x0016), (0x0008, 0x0018)],
            )
        except FileNotFoundError:
            return NO_SUCH_OBJECT_INSTANCE
        except (OSError, InvalidDicomError, ValueError, EOFError, KeyError, TypeError):
            return PROCESSING_FAILURE
        meta = getattr(ds, "file_meta", None)
        instance = str(ds.get("SOPInstanceUID", "") or "")
        if not instance and meta is not None:
            instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
        if instance != ref.sop_instance:
            return NO_SUCH_OBJECT_INSTANCE
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if not sop_class and meta is not None:
            sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        return None if sop_class == ref.sop_class else CLASS_INSTANCE_CONFLICT

    # ----------------------------------------------------------------- keeping

    def _path_of(self, commitment: Commitment) -> Path:
        key = hashlib.sha1(
            f"{commitment.calling}\x00{commitment.transaction_uid}".encode(),
            usedforsecurity=False,
        ).hexdigest()[:24]
        return self.folder / f"{self.owner}~{key}.json"

    def keep(self, commitment: Commitment) -> Path:
        """Write the pending report atomically and return its path.

        Raises
        ------
        OSError
            When it cannot be written (the request is then refused).
        """
        path = self._path_of(commitment)
        write_bytes_atomic(json.dumps(commitment.to_json()).encode("utf-8"), path)
        return path

    def accept(
        self, request: ActionRequest, calling: str, where: str, report_here: bool
    ) -> tuple[int, tuple[Commitment, Path] | None]:
        """Decide an N-ACTION: its status and, when accepted, the commitment as kept on disk.

        Accepted (0x0000) means the request is valid, its report has somewhere to
        go (this association, or a ``[Destination:NAME]`` of ``calling``) and it
        was written to the pending folder; otherwise a failure status and a
        ``COMMIT-FAILED`` line. Logs ``COMMIT-REQUESTED`` when accepted.
        """
        transaction = ""
        refs: tuple[Reference, ...] = ()
        refusal = judge_action(request)
        if refusal is None:
            try:
                transaction, refs = parse_action(request.data or b"", request.transfer_syntax)
            except ValueError as exc:
                refusal = INVALID_ARGUMENT, str(exc)
        if refusal is None and not report_here and self.destination(calling) is None:
            refusal = (
                PROCESSING_FAILURE,
                "no address to send the report to: the association did not negotiate the SCP "
                f"role for it and no [Destination:NAME] has ae_title = {calling}",
            )
        commitment = Commitment(transaction, calling, where, refs, created=time.time())
        path = None
        if refusal is None:
            try:
                path = self.keep(commitment)
            except OSError as exc:
                refusal = PROCESSING_FAILURE, f"cannot keep the request: {exc.strerror or exc}"
        if refusal is not None or path is None:
            status, why = refusal or (PROCESSING_FAILURE, "not kept")
            logger.error(
                "COMMIT-FAILED transaction_uid=%s calling_ae=%s peer=%s instances=%d "
                "status=0x%04X reason=%s",
                escape(transaction) or "-",
                calling,
                where,
                len(refs),
                status,
                escape(why),
                extra=_event(EventKind.COMMIT_FAILED, commitment, f"refused 0x{status:04X}: {why}"),
            )
            return status, None
        logger.info(
            "COMMIT-REQUESTED transaction_uid=%s calling_ae=%s peer=%s instances=%d reply=%s",
            escape(transaction),
            calling,
            where,
            len(refs),
            "same-association" if report_here else "new-association",
            extra=_event(EventKind.COMMIT_REQUESTED, commitment, "request accepted"),
        )
        return SUCCESS, (commitment, path)

    def checked(self, commitment: Commitment, path: Path) -> tuple[Commitment, Path]:
        """Check an accepted commitment and keep its result (after the N-ACTION-RSP)."""
        commitment = self.check(commitment)
        with contextlib.suppress(OSError):  # unchecked, it is checked again after a restart
            self.keep(commitment)
        return commitment, path

    def destination(self, calling: str) -> DestinationConfig | None:
        """Return the ``[Destination:NAME]`` whose ``ae_title`` is ``calling``, or None."""
        return destination_for(self.cfg.destinations, calling)

    def delivered(self, commitment: Commitment, path: Path, how: str) -> None:
        """Log the outcome of a report the requester answered with success and forget it."""
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        if commitment.failed:
            reasons = collections.Counter(f"0x{reason:04X}" for _, reason in commitment.failed)
            logger.warning(
                "COMMIT-FAILED transaction_uid=%s calling_ae=%s peer=%s committed=%d failed=%d "
                "reasons=%s reply=%s",
                escape(commitment.transaction_uid),
                commitment.calling,
                commitment.peer,
                len(commitment.committed),
                len(commitment.failed),
                ",".join(f"{k}:{v}" for k, v in sorted(reasons.items())),
                how,
                extra=_event(EventKind.COMMIT_FAILED, commitment, "report answered", how),
            )
        else:
            logger.info(
                "COMMITTED transaction_uid=%s calling_ae=%s peer=%s committed=%d failed=0 reply=%s",
                escape(commitment.transaction_uid),
                commitment.calling,
                commitment.peer,
                len(commitment.committed),
                how,
                extra=_event(EventKind.COMMITTED, commitment, "report answered", how),
            )

    def undeliverable(self, commitment: Commitment, path: Path, reason: str) -> None:
        """Give a report up: log ``COMMIT-FAILED`` and delete its pending file."""
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        logger.error(
            "COMMIT-FAILED transaction_uid=%s calling_ae=%s peer=%s committed=%d failed=%d "
            "reason=report not delivered: %s",
            escape(commitment.transaction_uid),
            commitment.calling,
            commitment.peer,
            len(commitment.committed),
            len(commitment.failed),
            reason,
            extra=_event(EventKind.COMMIT_FAILED, commitment, f"report not delivered: {reason}"),
        )

    def schedule(self, commitment: Commitment, path: Path, attempts: int = 0) -> None:
        """Queue a report for delivery on a new association (now, or after a failed attempt)."""
        if self.destination(commitment.calling) is None:
            self.undeliverable(
                commitment,
                path,
                f"no [Destination:NAME] with ae_title = {commitment.calling} to send it to",
            )
            return
        due = time.monotonic() + (retry_delay(attempts) if attempts else 0.0)
        with self._lock:
            self._queue[str(path)] = _Pending(commitment, path, attempts, due)
        self._wake.set()

    # ----------------------------------------------------------------- delivering

    def start(self) -> None:
        """Start the delivery thread (claims orphaned reports of a previous run)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="Commitment", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the delivery thread; undelivered reports stay on disk for the next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def _claim_orphans(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.folder.glob(f"{ORPHAN_PREFIX}*.json")):
                mine = self.folder / f"{self.owner}~{path.name[len(ORPHAN_PREFIX) :]}"
                try:
                    os.replace(path, mine)  # one process wins the rename
                except OSError:
                    continue
                try:
                    commitment = Commitment.from_json(json.loads(mine.read_text("utf-8")))
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    logger.error(
                        "COMMIT-FAILED pending report %s is unreadable (%s); removed", mine, exc
                    )
                    with contextlib.suppress(OSError):
                        mine.unlink()
                    continue
                if not commitment.checked:
                    commitment = self.check(commitment)
                    with contextlib.suppress(OSError):
                        write_bytes_atomic(json.dumps(commitment.to_json()).encode("utf-8"), mine)
                logger.info(
                    "COMMIT-DEFERRED transaction_uid=%s calling_ae=%s resumed after restart",
                    escape(commitment.transaction_uid),
                    commitment.calling,
                )
                self.schedule(commitment, mine)

    def _run(self) -> None:
        next_scan = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_scan:
                self._claim_orphans()
                next_scan = now + _SCAN_S
            with self._lock:
                due = [p for p in self._queue.values() if p.due <= now]
                waits = [p.due - now for p in self._queue.values() if p.due > now]
            for pending in due:
                if self._stopping.is_set():
                    return
                self._attempt(pending)
            timeout = min([*waits, next_scan - time.monotonic(), _SCAN_S])
            self._wake.wait(max(0.05, timeout) if not due else 0.0)
            self._wake.clear()

    def _attempt(self, pending: _Pending) -> None:
        commitment, path = pending.commitment, pending.path
        with self._lock:
            self._queue.pop(str(path), None)
        dest = self.destination(commitment.calling)
        if dest is None:
            self.undeliverable(commitment, path, "its [Destination:NAME] was removed")
            return
        try:
            self.send_new_association(commitment, dest)
        except (LinkError, OSError, ValueError) as exc:
            attempts = pending.attempts + 1
            if time.time() - commitment.created > GIVE_UP_S:
                self.undeliverable(commitment, path, f"{exc}; given up after {attempts} attempts")
                return
            logger.warning(
                "COMMIT-DEFERRED transaction_uid=%s calling_ae=%s destination=%s:%d attempt=%d "
                "reason=%s; retry in %g s",
                escape(commitment.transaction_uid),
                commitment.calling,
                dest.host,
                dest.port,
                attempts,
                escape(str(exc)),
                retry_delay(attempts),
            )
            self.schedule(commitment, path, attempts)
            return
        self.delivered(commitment, path, f"new-association {dest.host}:{dest.port}")

    def next_message_id(self) -> int:
        """Return a message ID for an N-EVENT-REPORT-RQ."""
        with self._lock:
            self._message_id = self._message_id % 0xFFFF + 1
            return self._message_id

    def send_new_association(self, commitment: Commitment, dest: DestinationConfig) -> None:
        """Deliver the report on a new association to ``dest`` (the node proposes the SCP role).

        Raises
        ------
        LinkError, OSError, ValueError
            When the association cannot be made, the report is refused or not answered.
        """
        where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        timeout = self.cfg.network_timeout_s
        sock = socket.create_connection((dest.host, dest.port), timeout=self.cfg.acse_timeout_s)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = PduLink(sock, where, False, self.cfg.acse_timeout_s)
        try:
            syntaxes = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
            request = A_ASSOCIATE_RQ(
                dest.ae_title,
                self.cfg.ae_title,
                APPLICATION_CONTEXT,
                (ProposedContext(1, STORAGE_COMMITMENT_SOP_CLASS, syntaxes),),
                self.cfg.max_pdu_bytes,
                roles=(RoleSelection(STORAGE_COMMITMENT_SOP_CLASS, scu=False, scp=True),),
            )
            link.send(request.encode(), "requesting the association")
            pdu_type, body = link.read_pdu("waiting for the association answer")
            if pdu_type == PduType.A_ASSOCIATE_RJ:
                raise LinkError(
                    f"{where} rejected the association ({A_ASSOCIATE_RJ.decode(body).describe()})"
                )
            if pdu_type != PduType.A_ASSOCIATE_AC:
                raise LinkError(f"{where} answered with PDU type 0x{pdu_type:02X}")
            answer = A_ASSOCIATE_AC.decode(body)
            accepted = [r for r in answer.results if r.result == ACCEPTANCE and r.context_id == 1]
            if not accepted:
                raise LinkError(f"{where} did not accept the Storage Commitment context")
            link.set_timeout(timeout)
            self.send_report(link.send, commitment, 1, accepted[0].transfer_syntax, answer.max_pdu)
            status = self._read_report_answer(link, where)
            if status != 0:
                raise LinkError(f"{where} answered the N-EVENT-REPORT with status 0x{status:04X}")
            with contextlib.suppress(LinkError, LinkTimeout):
                link.send(A_RELEASE_RQ_PDU, "releasing")
                link.read_pdu("waiting for the release answer")
        except LinkTimeout as exc:
            raise LinkError(f"{where} did not answer in time ({exc})") from None
        finally:
            link.close()

    def send_report(
        self,
        send: Callable[[bytes], object],
        commitment: Commitment,
        context_id: int,
        transfer_syntax: str,
        max_pdu: int,
        message_id: int = 0,
    ) -> int:
        """Send the N-EVENT-REPORT-RQ of ``commitment`` with ``send``; return its message ID."""
        message_id = message_id or self.next_message_id()
        command = n_event_report_rq(
            message_id,
            STORAGE_COMMITMENT_SOP_CLASS,
            STORAGE_COMMITMENT_INSTANCE,
            commitment.event_type,
        )
        send(p_data_tf(context_id, PDV_COMMAND | PDV_LAST, command))
        pieces = fragments(encode_report(commitment, transfer_syntax), max_pdu)
        for i, piece in enumerate(pieces):
            send(p_data_tf(context_id, PDV_LAST if i == len(pieces) - 1 else 0, piece))
        return message_id

    @staticmethod
    def _read_report_answer(link: PduLink, where: str) -> int:
        command = bytearray()
        while True:
            pdu_type, body = link.read_pdu("waiting for the N-EVENT-REPORT-RSP")
            if pdu_type != PduType.P_DATA_TF:
                raise LinkError(f"{where} sent PDU type 0x{pdu_type:02X} instead of a response")
            for _cid, control, fragment in iter_pdvs(body):
                if not control & PDV_COMMAND:
                    continue
                command += fragment
                if control & PDV_LAST:
                    rsp = parse_command(bytes(command))
                    if command_us(rsp, COMMAND_FIELD) == N_EVENT_REPORT_RSP:
                        return command_us(rsp, STATUS) or 0
                    command.clear()

"""Filing of received objects, shared by both receiver transports.

:meth:`StoreHandler.finish` turns a completely received temp file into the
C-STORE status: disk guard and ``max_object_mb``, the element structure check
(:mod:`dicomnode.integrity`), the header (only), the final path
(:mod:`dicomnode.organise`), then durability — its receive journal record
flushed (:mod:`.journal`) or the file fsynced — and the atomic rename (with
folder fsync when not journaled, :mod:`dicomnode.storage`). Success is
answered only after that rename.
Objects that cannot be filed are kept in ``errors/`` with a note. Log verbs:
``STORED``, ``STORE-FAILED``, ``ECHO``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.config import ReceiverConfig
from dicomnode.dicomtags import (
    HEADER_TAG_NUMBERS,
    header_from_elements,
    is_valid_uid,
    read_header,
    safe_component,
    text_of,
)
from dicomnode.integrity import Examination, examine
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.logsafe import escape
from dicomnode.organise import (
    FolderLevel,
    file_name,
    folder_plan,
    instance_file_name,
    modality_prefix,
)
from dicomnode.receiver import policy
from dicomnode.receiver.journal import Journal
from dicomnode.status import StoreStatus
from dicomnode.storage import (
    DiskGuard,
    FolderResolver,
    GroupSync,
    fsync_dirs,
    fsync_paths,
    place_file,
    quarantine,
)

logger = logging.getLogger(__name__)

#: Header values that differ between the instances of one series (not part of the folder).
_PER_INSTANCE_TAGS: Final = frozenset({0x00080018, 0x00200013, 0x00280008})
_SOP_INSTANCE_UID: Final = 0x00080018
_SOP_CLASS_UID: Final = 0x00080016
#: Folders remembered (one per series); the memory is cleared when full.
_FOLDER_CACHE_SIZE: Final = 512

#: Called after an object is durable: (final path, AE folder, SOP Class UID).
PostStore = Callable[[Path, Path, str], None]


def _plain_uid(element: tuple[bytes, bytes] | None) -> str:
    """Return a raw UID value as text when it is a valid UID, else "" (pydicom decides then)."""
    if element is None:
        return ""
    text = element[1].decode("ascii", "replace").strip("\x00 ")
    return text if is_valid_uid(text) else ""


def _refused(calling: str, where: str, uid: str, status: int, reason: str) -> dict[str, object]:
    """Return the ledger event of a refused object (``extra=`` of a STORE-FAILED line)."""
    return ledger_extra(
        EventKind.STORE_REFUSED,
        calling_ae=calling,
        peer=where,
        sop_uid=uid or None,
        status=f"0x{status:04X}",
        reason=reason,
    )


def _header_fields(header: _Header) -> dict[int, tuple[bytes, bytes]]:
    """Return header values as raw elements when the walk had none (deflated objects)."""
    try:
        ds = header.get()
    except Exception:
        return {}
    out: dict[int, tuple[bytes, bytes]] = {0x00080005: (b"CS", b"ISO_IR 192")}
    for tag in (
        0x00100020,
        0x00100010,
        0x0020000D,
        0x00080020,
        0x00081030,
        0x0020000E,
        0x00080060,
        0x00080016,
    ):
        if tag in ds:
            out[tag] = (b"", str(ds[tag].value).encode("utf-8", "replace"))
    return out


@dataclass(frozen=True, slots=True)
class ReceivedObject:
    """One completely received object, as a transport hands it to :meth:`StoreHandler.finish`.

    Attributes
    ----------
    tmp : Path
        The received object (File Meta Information + data set as received),
        closed, in the temp folder of the destination volume, not yet flushed:
        :meth:`StoreHandler.finish` makes it durable (receive journal or fsync).
    calling, where : str
        Calling AE title and "ip:port" of the peer, for routing and logs.
    started : float
        ``time.monotonic()`` when the request arrived.
    affected_uid : str
        Affected SOP Instance UID of the request (for logs before parsing).
    write_error : OSError or None
        The error that stopped writing ``tmp`` (disk full, disk guard).
    too_large : bool
        True when the transport stopped writing at ``max_object_mb``.
    content : bytes-like or None
        The complete content of ``tmp`` when the transport still holds it
        (small objects): checked and parsed without reading the file back.
    command_uids : tuple of str or None
        ``(Affected SOP Class UID, Affected SOP Instance UID)`` of the request
        command. When given, they must equal the data set's SOP Class and SOP
        Instance UID: the File Meta Information is built from the command, and
        a file whose header contradicts its data set would later be refused by
        the forwarding target.
    """

    tmp: Path
    calling: str
    where: str
    started: float
    affected_uid: str
    write_error: OSError | None = None
    too_large: bool = False
    content: bytes | bytearray | None = None
    command_uids: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Filing:
    """What :meth:`StoreHandler.finish` decided: the C-STORE status and the deferred log lines.

    ``reports`` holds the ``STORED`` line when ``defer_report`` was asked for;
    the transport calls each after it sent the response.
    """

    status: int
    reports: tuple[Callable[[], None], ...] = ()


class _Header:
    """The header of one received object, decoded from the walk only when it is needed."""

    def __init__(self, tmp: Path, exam: Examination) -> None:
        self.tmp = tmp
        self.exam = exam
        self._ds: Dataset | None = None

    def get(self) -> Dataset:
        """Return the header Dataset (pydicom reads the file when the walk has no values).

        Raises
        ------
        InvalidDicomError, ValueError, EOFError, KeyError, TypeError, OSError
            When pydicom cannot read the file.
        """
        if self._ds is None:
            if self.exam.elements or self.exam.deflated:  # never inflate a whole data set
                self._ds = header_from_elements(
                    self.exam.elements, self.exam.implicit, self.exam.little
                )
            else:
                self._ds = read_header(self.tmp)
        return self._ds


class StoreHandler:
    """Handle C-STORE and C-ECHO requests of admitted peers.

    Parameters
    ----------
    cfg : ReceiverConfig
        Receiver settings.
    post_store : callable, optional
        Called after an object is durable (the Enhanced MR conversion seam).
    """

    def __init__(self, cfg: ReceiverConfig, post_store: PostStore | None = None) -> None:
        self.cfg = cfg
        self.post_store = post_store
        #: Told (SOP Instance UID, final path) of every filed object (the commitment index).
        self.on_stored: Callable[[str, Path], None] | None = None
        self._max_bytes = cfg.max_object_mb * 1_000_000
        self._plans: dict[object, tuple[tuple[FolderLevel, ...], str]] = {}
        self._resolver = FolderResolver(lock_dir=cfg.destination_dir)
        #: Flushes of received temp files, shared by objects filed at the same moment.
        self.file_sync = GroupSync(fsync_paths)
        #: Folder flushes after renames, shared by objects filed at the same moment.
        self.folder_sync = GroupSync(fsync_dirs)
        #: The process's receive journal (set by the receiver when ``journal_mb`` > 0).
        self.journal: Journal | None = None
        #: ``min_free_space_mb``, checked when a request arrives and before filing.
        self.disk_guard = DiskGuard(cfg.min_free_space_mb)
        # AE folders below destination_dir share its volume: its free-space check covers them.
        self._local_roots = {cfg.destination_dir / "incoming"} | {
            folder for _, folder in cfg.ae_mappings if folder.is_relative_to(cfg.destination_dir)
        }

    def log_echo(self, calling: str, where: str) -> int:
        """Log a C-ECHO of an admitted peer and return its status, 0x0000 Success."""
        logger.info("ECHO calling_ae=%s peer=%s", calling, where)
        return int(StoreStatus.SUCCESS)

    def finish(self, received: ReceivedObject, defer_report: bool = False) -> Filing:
        """File one completely received object and return its C-STORE status.

        Parameters
        ----------
        received : ReceivedObject
            The object as the transport received it (see :class:`ReceivedObject`).
        defer_report : bool
            When True the ``STORED`` log line is not logged but returned in
            :attr:`Filing.reports`, so the transport can send the response first.

        Returns
        -------
        Filing
            ``status`` is one of:
            0x0000 Success: the object is on disk (its receive journal record
            flushed, or the file fsynced) and renamed into its final place (its
            folder fsynced when not journaled).
            0xA700 Refused, out of resources: disk guard, object too large, the
            received data could not be written to the temp file (disk full), or an
            OS error while filing it (permission, bad path).
            0xC000 Error, cannot understand: the object is structurally incomplete
            (an element runs past the end: truncated), cannot be parsed, or has no
            valid SOP Instance UID.
            0xA900 Error, data set does not match SOP class: the command's Affected
            SOP Class or Instance UID differs from the data set's (PS3.4 B.2.3;
            only checked when ``command_uids`` is given).
            0x0110 Processing failure: an unexpected error in the node.
            Never raises; ``tmp`` is filed, kept in errors/ or deleted.
        """
        tmp, calling, where = received.tmp, received.calling, received.where
        affected_uid, write_error = received.affected_uid, received.write_error
        reports: list[Callable[[], None]] | None = [] if defer_report else None
        status = int(StoreStatus.PROCESSING_FAILURE)
        try:
            if write_error is not None or received.too_large:
                if write_error is not None:
                    status = self._refuse_unwritable(tmp, calling, where, affected_uid, write_error)
                else:
                    status = self._refuse_too_large(calling, where, affected_uid, None)
            else:
                status = self._store(received, reports)
        except Exception as exc:
            logger.exception("STORE-FAILED calling_ae=%s peer=%s unexpected error", calling, where)
            self._keep(tmp, affected_uid, f"unexpected error: {exc!r}")
        finally:
            if status != StoreStatus.SUCCESS:
                # A refused object is not kept in the temp folder (its sender still has it).
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        return Filing(status, tuple(reports or ()))

    def _refuse_too_large(
        self, calling: str, where: str, affected_uid: str, size: int | None
    ) -> int:
        what = f"object of {size} bytes" if size is not None else "object"
        self._keep(None, affected_uid, f"{what} exceeds max_object_mb={self.cfg.max_object_mb}")
        logger.error(
            "STORE-FAILED calling_ae=%s peer=%s status=0xA700 reason=object larger than max_object_mb=%d",
            calling,
            where,
            self.cfg.max_object_mb,
            extra=_refused(
                calling, where, affected_uid, 0xA700, "object larger than max_object_mb"
            ),
        )
        return int(StoreStatus.OUT_OF_RESOURCES)

    def _plan(self, header: _Header, sop_uid: str) -> tuple[tuple[FolderLevel, ...], str]:
        """Return the object's folder plan and file name; the plan is computed once per series.

        The plan (and the modality part of the file name) depend only on header
        values other than the per-instance ones, so they are remembered under
        their raw bytes and encoding: later objects of the series need neither
        the decoded header nor name cleaning, only their (valid) SOP Instance UID.
        """
        exam = header.exam
        if not exam.elements:
            ds = header.get()
            return folder_plan(ds, self.cfg.folder_layout), file_name(ds)
        key = (
            exam.implicit,
            exam.little,
            tuple(sorted(i for i in exam.elements.items() if i[0] not in _PER_INSTANCE_TAGS)),
        )
        known = self._plans.get(key)
        if known is None:
            ds = header.get()
            known = (folder_plan(ds, self.cfg.folder_layout), modality_prefix(ds))
            if len(self._plans) >= _FOLDER_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = known
        plan, prefix = known
        return plan, instance_file_name(prefix, sop_uid)

    def _place(
        self,
        received: ReceivedObject,
        size: int,
        ae_root: Path,
        plan: tuple[FolderLevel, ...],
        name: str,
    ) -> Path:
        """Make the received object durable in the folder of ``plan`` (found or created by identity).

        The temp file is written to the receive journal (one flush) and renamed,
        or (too large for the journal, no journal, an AE folder elsewhere)
        fsynced, renamed and its folder flushed.

        Raises
        ------
        OSError
            When the folder cannot be created, the journal not written or the file not moved.
        """
        tmp = received.tmp
        journal = self.journal
        content = received.content
        if (
            journal is None
            or content is None
            or not journal.fits(size)
            or ae_root not in self._local_roots
        ):
            # An AE folder outside destination_dir (maybe another volume: the object is
            # copied there, fsynced) is filed the classic way; the temp file is flushed first
            # (group commit: objects of other associations finishing now share the flush).
            self.file_sync.sync(tmp)
            journal = None
        for attempt in range(4):
            try:
                final = self._resolver.resolve(ae_root, plan) / name
                if journal is not None and content is not None:
                    entry = journal.commit(final, content)
                    try:
                        os.replace(tmp, final)
                    finally:
                        journal.placed(entry)
                else:
                    place_file(tmp, final, create_folders=False, sync_dir=self.folder_sync.sync)
                return final
            except FileNotFoundError:
                # A forwarder removed the (emptied) folder since it was found: find
                # or create it again, under the folder lock.
                if attempt == 3 or not tmp.exists():
                    raise
                self._resolver.forget()
        raise AssertionError("unreachable")

    def _judge(self, tmp: Path, content: bytes | bytearray | None) -> tuple[_Header, str | None]:
        """Walk the object once; return its (lazy) header and why it cannot be filed, or None."""
        try:
            # The temp file is ours alone: it may be walked through a memory map.
            exam = examine(
                content if content is not None else tmp, HEADER_TAG_NUMBERS, private=True
            )
        except OSError as exc:
            exam = Examination(f"cannot read the received object: {exc.strerror or exc}")
        header = _Header(tmp, exam)
        if exam.defect is not None:
            return header, f"malformed object: {exam.defect}"
        if not exam.elements:
            try:
                header.get()  # no header values in the walk: pydicom reads it now
            except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, OSError) as exc:
                return header, f"unreadable object: {exc}"
        return header, None

    def _store(self, received: ReceivedObject, reports: list[Callable[[], None]] | None) -> int:
        tmp, calling, where = received.tmp, received.calling, received.where
        affected_uid, content, command_uids = (
            received.affected_uid,
            received.content,
            received.command_uids,
        )
        if self.disk_guard.shortfall(tmp.parent) is not None:
            logger.error(
                "STORE-FAILED calling_ae=%s peer=%s status=0xA700 reason=free space below "
                "min_free_space_mb=%d on %s",
                calling,
                where,
                self.cfg.min_free_space_mb,
                self.cfg.destination_dir,
                extra=_refused(calling, where, affected_uid, 0xA700, "free space below guard"),
            )
            return int(StoreStatus.OUT_OF_RESOURCES)
        size = len(content) if content is not None else tmp.stat().st_size
        if self._max_bytes and size > self._max_bytes:
            return self._refuse_too_large(calling, where, affected_uid, size)
        header, problem = self._judge(tmp, content)
        sop_uid = ""
        if problem is None:
            sop_uid = _plain_uid(header.exam.elements.get(_SOP_INSTANCE_UID))
            if not sop_uid:
                sop_uid = text_of(header.get(), "SOPInstanceUID")
            if not sop_uid or not is_valid_uid(sop_uid):
                problem = f"missing or invalid SOP Instance UID {sop_uid!r}"
        if problem is not None:
            return self._fail(tmp, calling, where, StoreStatus.CANNOT_UNDERSTAND, problem)
        if command_uids is not None:
            mismatch = self._command_mismatch(header, sop_uid, command_uids)
            if mismatch is not None:
                return self._fail(
                    tmp, calling, where, StoreStatus.DATASET_MISMATCH, mismatch, sop_uid
                )
        ae_root = policy.route_for(self.cfg, calling)
        if ae_root not in self._local_roots and self.disk_guard.shortfall(ae_root) is not None:
            logger.error(
                "STORE-FAILED calling_ae=%s peer=%s sop_instance_uid=%s status=0xA700 reason=free "
                "space below min_free_space_mb=%d on %s",
                calling,
                where,
                sop_uid,
                self.cfg.min_free_space_mb,
                ae_root,
                extra=_refused(calling, where, sop_uid, 0xA700, "free space below guard"),
            )
            return int(StoreStatus.OUT_OF_RESOURCES)
        plan, name = self._plan(header, sop_uid)
        try:
            final = self._place(received, size, ae_root, plan, name)
        except OSError as exc:
            planned = ae_root.joinpath(*(level.name for level in plan), name)
            return self._fail(
                tmp,
                calling,
                where,
                StoreStatus.OUT_OF_RESOURCES,
                f"cannot write {planned}: {exc.strerror or exc}",
                sop_uid,
            )
        ms = (time.monotonic() - received.started) * 1000

        def stored_line() -> None:
            logger.info(
                "STORED calling_ae=%s sop_instance_uid=%s bytes=%d ms=%.0f path=%s",
                calling,
                sop_uid,
                size,
                ms,
                final,
                # The ledger writer decodes the raw header elements (off this path); the
                # checksum of an object still in memory is taken here, after the response,
                # so the writer need not read the file back.
                extra=ledger_extra(
                    EventKind.STORED,
                    calling_ae=calling,
                    peer=where,
                    sop_uid=sop_uid,
                    size=size,
                    path=str(final),
                    duration_ms=ms,
                    checksum=hashlib.sha256(content).hexdigest() if content is not None else None,
                    elements=header.exam.elements or _header_fields(header),
                ),
            )

        if reports is None:
            stored_line()
        else:
            reports.append(stored_line)
        if self.on_stored is not None:
            self.on_stored(sop_uid, final)
        if self.post_store is not None:
            try:
                sop_class = _plain_uid(header.exam.elements.get(_SOP_CLASS_UID))
                self.post_store(final, ae_root, sop_class or text_of(header.get(), "SOPClassUID"))
            except Exception:
                logger.exception("post-store step failed for %s (object is stored)", final)
        return int(StoreStatus.SUCCESS)

    @staticmethod
    def _command_mismatch(
        header: _Header, sop_uid: str, command_uids: tuple[str, str]
    ) -> str | None:
        """Return why the request command contradicts the data set's UIDs, or None."""
        affected_class, affected_instance = command_uids
        if affected_instance != sop_uid:
            return (
                f"Affected SOP Instance UID '{escape(affected_instance)}' of the command "
                f"differs from the data set's SOP Instance UID '{sop_uid}'"
            )
        sop_class = _plain_uid(header.exam.elements.get(_SOP_CLASS_UID))
        if not sop_class:
            sop_class = text_of(header.get(), "SOPClassUID")
        if affected_class != sop_class:
            return (
                f"Affected SOP Class UID '{escape(affected_class)}' of the command differs "
                f"from the data set's SOP Class UID '{escape(sop_class)}'"
            )
        return None

    def _refuse_unwritable(
        self, tmp: Path, calling: str, where: str, affected_uid: str, exc: OSError
    ) -> int:
        """Answer 0xA700 for an object whose temp file could not be written (disk full)."""
        logger.error(
            "STORE-FAILED calling_ae=%s peer=%s sop_instance_uid=%s status=0xA700 "
            "reason=cannot write the received object to %s: %s",
            calling,
            where,
            affected_uid or "-",
            tmp.parent,
            exc.strerror or exc,
            extra=_refused(
                calling, where, affected_uid, 0xA700, "cannot write the received object"
            ),
        )
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            logger.debug("could not remove %s", tmp, exc_info=True)
        return int(StoreStatus.OUT_OF_RESOURCES)

    def _fail(
        self,
        tmp: Path,
        calling: str,
        where: str,
        status: StoreStatus,
        reason: str,
        sop_uid: str = "",
    ) -> int:
        logger.error(
            "STORE-FAILED calling_ae=%s peer=%s sop_instance_uid=%s status=0x%04X reason=%s",
            calling,
            where,
            sop_uid or "-",
            int(status),
            reason,
            extra=_refused(calling, where, sop_uid, int(status), reason),
        )
        self._keep(
            tmp,
            sop_uid,
            f"{reason} (calling AE {calling}, peer {where}, answered 0x{int(status):04X})",
        )
        return int(status)

    def _keep(self, tmp: Path | None, uid: str, reason: str) -> None:
        hint = safe_component(uid or "unknown", "unknown", 64)
        quarantine(
            tmp if tmp is not None and tmp.exists() else None, self.cfg.errors_dir, hint, reason
        )

"""Forwarder lifecycle: scheduler, workers, retry bookkeeping, one-shot send and retry-failed.

:class:`Forwarder` owns three kinds of threads: the watchdog observer (via
:class:`~.watcher.EventSource`, unless polling), one scheduler that rescans,
decides readiness with :class:`~.batching.ReadinessTracker` and claims quiet
groups, and ``max_workers`` workers that each send one group
(:func:`send_group`). Every per-file decision is applied on disk immediately
(delete after success, park after refusal), so a kill at any moment loses
nothing; network failures are recorded in :class:`~.state.StateStore` and
retried with exponential backoff until ``give_up_after_s``. Log verbs:
``BATCH-READY``, ``SENT``, ``SEND-FAILED``, ``QUARANTINED``, ``RETRY-SCHEDULED``,
``HEARTBEAT``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.config import ForwarderConfig
from dicomnode.dicomtags import HEADER_TAGS, text_of
from dicomnode.errors import ConfigError
from dicomnode.forwarder.batching import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    TOPLEVEL_GROUP,
    FileEntry,
    GroupSnapshot,
    ObjectInfo,
    ReadinessTracker,
    RefusalVerdict,
    SendOutcome,
    backoff_delay_s,
    category_rank,
    group_entries,
    group_label,
    judge_refusal,
    order_objects,
    plan_associations,
    should_give_up,
)
from dicomnode.forwarder.lean import LeanAssociationSender
from dicomnode.forwarder.outcome import (
    ParkReason,
    delete_delivered,
    move_back_failed,
    park_file,
    park_stamp,
)
from dicomnode.forwarder.sender import AssociationSender
from dicomnode.forwarder.state import RetryState, StateStore
from dicomnode.forwarder.transcode import EXPLICIT_VR_BE
from dicomnode.forwarder.watcher import (
    EventSource,
    Skipped,
    SkipReport,
    has_pending_conversion,
    scan_folder,
)
from dicomnode.integrity import examine, find_defect, read_header_bounded
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.logsafe import escape
from dicomnode.status import ExitStatus

logger = logging.getLogger(__name__)

_TICK_S: Final = 0.2


# --------------------------------------------------------------------------- one group


@dataclass(frozen=True, slots=True)
class JobFile:
    """One file of a group job, with the size and mtime it had when the group was claimed.

    Attributes
    ----------
    path : Path
        The file on disk.
    display : str
        How logs name it (path relative to the watch folder or send argument).
    inside : PurePosixPath
        Path kept below ``failed/<stamp>_<group>/`` if it is parked.
    size, mtime_ns : int
        Expected size and modification time; any difference means "still changing".
    """

    path: Path
    display: str
    inside: PurePosixPath
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class GroupJob:
    """A claimed group: its files and where parked files and pruning stop.

    Attributes
    ----------
    key : str
        Group key (top-level folder name, empty for loose files).
    files : tuple of JobFile
        The group's files.
    park_root : Path
        Watch folder whose ``failed/`` receives refused files.
    prune_root : Path
        Highest folder never removed when it becomes empty.
    """

    key: str
    files: tuple[JobFile, ...]
    park_root: Path
    prune_root: Path


@dataclass(slots=True)
class GroupResult:
    """Counts and end state of one :func:`send_group` call.

    ``deferred`` counts the kept objects the target refused temporarily while it
    accepted others; ``held`` says later objects waited for them (clinical
    order); ``refusals`` holds the refusal counts of the kept files by display name.
    """

    sent: int = 0
    parked: int = 0
    retry: list[tuple[JobFile, ObjectInfo | None]] = field(default_factory=list)
    network_error: str | None = None
    changed: bool = False
    stopped: bool = False
    deferred: int = 0
    held: bool = False
    refusals: dict[str, int] = field(default_factory=dict)


def job_from_snapshot(watch_folder: Path, snap: GroupSnapshot) -> GroupJob:
    """Turn a scanned group of the watch folder into a job."""
    files = tuple(
        JobFile(
            path=watch_folder.joinpath(*e.rel_path.parts),
            display=e.rel_path.as_posix(),
            inside=PurePosixPath(*e.rel_path.parts[1:])
            if snap.key != TOPLEVEL_GROUP
            else e.rel_path,
            size=e.size,
            mtime_ns=e.mtime_ns,
        )
        for e in snap.files
    )
    return GroupJob(snap.key, files, watch_folder, watch_folder)


def _is_unchanged(jf: JobFile) -> bool:
    try:
        st = jf.path.stat()
    except OSError:
        return False
    return st.st_size == jf.size and st.st_mtime_ns == jf.mtime_ns


def _int_or_none(value: str) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def make_sender(config: ForwarderConfig, ssl_context: ssl.SSLContext | None) -> AssociationSender:
    """Return the forwarder's SCU (the lean one; ``transport = pynetdicom`` is retired)."""
    return LeanAssociationSender(config, ssl_context)


def inspect_file(jf: JobFile, key: PurePosixPath) -> ObjectInfo | ParkReason:
    """Read the header facts of one file, or say why it cannot be sent.

    Parameters
    ----------
    jf : JobFile
        The file.
    key : PurePosixPath
        Identifier stored as ``ObjectInfo.rel_path``.

    Returns
    -------
    ObjectInfo or ParkReason
        ParkReason for empty, unreadable and non-DICOM files and for objects
        without SOP Class / SOP Instance UID.
    """
    if jf.size == 0:
        return ParkReason(None, "empty file (0 bytes)")
    bare = False
    try:
        ds = read_header_bounded(jf.path)  # a deflated data set is never inflated whole
    except (InvalidDicomError, EOFError) as exc:
        found = read_bare_header(jf.path)
        if found is None:
            return ParkReason(None, f"not a DICOM file: {exc}")
        ds, bare = found, True
    except OSError as exc:
        return ParkReason(None, f"unreadable: {exc.strerror or exc}")
    except Exception as exc:  # pydicom raises many types on corrupt headers
        return ParkReason(None, f"not a readable DICOM file: {type(exc).__name__}: {exc}")
    meta = getattr(ds, "file_meta", None)
    meta_class = text_of(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    meta_uid = text_of(meta, "MediaStorageSOPInstanceUID") if meta is not None else ""
    # The C-STORE carries the data set's own UIDs; the File Meta header may disagree.
    sop_class = text_of(ds, "SOPClassUID") or meta_class
    sop_uid = text_of(ds, "SOPInstanceUID") or meta_uid
    ts = (text_of(meta, "TransferSyntaxUID") if meta is not None else "") or syntax_of_encoding(
        ds.original_encoding
    )
    if not sop_class or not sop_uid:
        return ParkReason(
            None, "DICOM file without SOP Class UID or SOP Instance UID", escaped(sop_uid)
        )
    for name, uid in (("SOP Class UID", sop_class), ("SOP Instance UID", sop_uid)):
        if not is_sendable_uid(uid):
            return ParkReason(None, f"invalid {name} {escaped(uid)!r}", escaped(sop_uid))
    if (meta_class and meta_class != sop_class) or (meta_uid and meta_uid != sop_uid):
        logger.warning(
            "UID-MISMATCH file=%s: File Meta says sop_class_uid=%s sop_instance_uid=%s, "
            "the data set says sop_class_uid=%s sop_instance_uid=%s; the data set's are sent",
            escaped(jf.display),
            escaped(meta_class),
            escaped(meta_uid),
            sop_class,
            sop_uid,
        )
    defect = bare_data_set_defect(jf.path, ts) if bare else find_defect(jf.path)
    if defect is not None:
        return ParkReason(None, f"truncated or malformed DICOM file: {defect}", sop_uid)
    return ObjectInfo(
        rel_path=key,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        transfer_syntax_uid=ts,
        modality=text_of(ds, "Modality"),
        series_number=_int_or_none(text_of(ds, "SeriesNumber")),
        instance_number=_int_or_none(text_of(ds, "InstanceNumber")),
    )


def syntax_of_encoding(encoding: tuple[bool | None, bool | None]) -> str:
    """Return the uncompressed transfer syntax of pydicom's ``(implicit VR, little endian)``."""
    implicit, little = encoding
    if implicit is not False:
        return IMPLICIT_VR_LE
    return EXPLICIT_VR_LE if little is not False else EXPLICIT_VR_BE


def read_bare_header(path: Path) -> Dataset | None:
    """Read the header of a data set stored without File Meta Information, or None.

    DCMTK's storescu sends such files (e.g. pydicom's ``rtstruct.dcm``); they count
    as DICOM only when their SOP Class and SOP Instance UIDs read as UIDs.
    """
    try:
        ds = dcmread(path, force=True, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    except Exception:  # anything that is not a data set
        return None
    sop_class, sop_uid = text_of(ds, "SOPClassUID"), text_of(ds, "SOPInstanceUID")
    if not (is_sendable_uid(sop_class) and is_sendable_uid(sop_uid)):
        return None
    return ds


def bare_data_set_defect(path: Path, syntax: str) -> str | None:
    """Return the structural defect of a data set without File Meta Information, or None."""
    uid = syntax.encode("ascii")
    if len(uid) % 2:
        uid += b"\0"
    meta = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(uid)) + uid
    return examine(b"\0" * 128 + b"DICM" + meta + path.read_bytes()).defect


def escaped(text: str) -> str:
    """Return ``text`` safe for one log line: :func:`dicomnode.logsafe.escape` (the one rule)."""
    return escape(text)


def is_sendable_uid(uid: str) -> bool:
    """Return True for a UID a C-STORE command can carry: printable ASCII without spaces.

    Deliberately lenient (like DCMTK's storescu): a UID that breaks the letter of
    PS3.5 9.1 (a letter, a leading zero, 65 characters) is the target's to judge.
    """
    return bool(uid) and all("!" <= c <= "~" and c != "\\" for c in uid)


def send_group(
    job: GroupJob,
    config: ForwarderConfig,
    sender: AssociationSender,
    should_stop: Callable[[], bool],
    on_file_done: Callable[[], None] | None = None,
    refusals: Mapping[str, int] | None = None,
) -> GroupResult:
    """Send one group in clinical order and apply each file's outcome on disk at once.

    Delivered files (success or warning) are deleted; refused ones (failure
    status, SOP class or transfer syntax not accepted, empty, unreadable or
    non-DICOM) are parked with a ``send_errors.log`` line; files that were not
    delivered because of network trouble stay and are listed in
    ``GroupResult.retry``. A file whose size or mtime differs from the claim is
    neither sent nor deleted (``changed``).

    Parameters
    ----------
    job : GroupJob
        The claimed group.
    config : ForwarderConfig
        Send order and target.
    sender : AssociationSender
        Opens the associations.
    should_stop : callable
        True stops between files (files stay).
    on_file_done : callable, optional
        Called after each file reached an outcome (progress bars).
    """
    result = GroupResult()
    stamp = park_stamp(time.time())
    label = group_label(job.key)
    by_key: dict[PurePosixPath, JobFile] = {}
    infos: list[ObjectInfo] = []
    for index, jf in enumerate(job.files):
        if should_stop():
            result.stopped = True
            return result
        key = PurePosixPath(str(index), *jf.inside.parts)
        found = inspect_file(jf, key)
        if isinstance(found, ParkReason):
            if not _is_unchanged(jf):
                result.changed = True
                continue
            if _park(job, jf, found, stamp):
                result.parked += 1
            if on_file_done:
                on_file_done()
            continue
        by_key[key] = jf
        infos.append(found)

    ordered = order_objects(infos, config.send_order)
    destination = f"{config.target_aet}@{config.target_ip}:{config.target_port}"
    last_result = [time.monotonic()]
    if ordered:
        logger.info(
            "BATCH-READY group=%s files=%d objects=%d target=%s@%s:%d",
            label,
            len(job.files),
            len(ordered),
            config.target_aet,
            config.target_ip,
            config.target_port,
        )

    counts = dict(refusals or {})
    decided: set[PurePosixPath] = set()
    # a transient refusal whose meaning the next answer of the target decides
    pending: tuple[ObjectInfo, int | None, str] | None = None
    # lowest send-order rank of a refused object that is kept (neither acknowledged nor parked)
    unsettled_rank: int | None = None

    def rank(obj: ObjectInfo) -> int:
        return category_rank(obj, config.send_order)

    def settle(obj: ObjectInfo, status: int | None, reason: str, singled_out: bool | None) -> None:
        """Apply the verdict on a transient refusal (see :func:`judge_refusal`)."""
        nonlocal unsettled_rank
        jf = by_key[obj.rel_path]
        verdict, count = judge_refusal(
            counts.get(jf.display, 0), singled_out, config.max_object_refusals
        )
        if verdict is RefusalVerdict.TARGET_WIDE:
            # like network trouble: the group is retried with backoff
            result.network_error = result.network_error or reason
        else:
            counts[jf.display] = count
            result.deferred += 1
        if verdict is RefusalVerdict.PARK:
            why = ParkReason(
                status,
                f"refused {count} time(s) while the target accepted other objects "
                f"(max_object_refusals={config.max_object_refusals}): {reason}",
                obj.sop_instance_uid,
            )
            logger.warning(
                "SEND-FAILED group=%s file=%s sop_instance_uid=%s %s",
                label,
                jf.display,
                obj.sop_instance_uid,
                why.describe(),
            )
            if _is_unchanged(jf) and _park(job, jf, why, stamp):
                result.parked += 1
                result.deferred -= 1
                counts.pop(jf.display, None)
                if on_file_done:
                    on_file_done()
                return
        elif verdict is RefusalVerdict.COUNTED:
            logger.warning(
                "DEFERRED group=%s file=%s sop_instance_uid=%s refusal=%d/%d: %s",
                label,
                jf.display,
                obj.sop_instance_uid,
                count,
                config.max_object_refusals,
                reason,
            )
        result.retry.append((jf, obj))  # kept: later kinds wait for it (clinical order)
        here = rank(obj)
        unsettled_rank = here if unsettled_rank is None else min(unsettled_rank, here)

    def resolve(singled_out: bool | None) -> None:
        """Settle the pending refusal, if any."""
        nonlocal pending
        if pending is not None:
            obj, status, reason = pending
            pending = None
            settle(obj, status, reason, singled_out)

    def on_result(obj: ObjectInfo, outcome: SendOutcome, status: int | None, reason: str) -> None:
        nonlocal pending
        jf = by_key[obj.rel_path]
        now = time.monotonic()
        took_ms, last_result[0] = (now - last_result[0]) * 1000, now
        decided.add(obj.rel_path)
        if outcome is SendOutcome.SENT or (outcome is SendOutcome.REFUSED and status is not None):
            resolve(True)  # the target answered another object: the refusal was that object's
        elif outcome is SendOutcome.RETRY:
            resolve(False)  # the target (or the network) fails for everything
        if outcome is SendOutcome.SENT:
            counts.pop(jf.display, None)
            if not _is_unchanged(jf):
                logger.warning(
                    "CHANGED-DURING-SEND group=%s file=%s: kept, will be sent again",
                    label,
                    jf.display,
                )
                result.changed = True
                return
            delete_delivered(jf.path, job.prune_root)
            result.sent += 1
            logger.info(
                "SENT group=%s file=%s sop_instance_uid=%s status=0x%04X",
                label,
                jf.display,
                obj.sop_instance_uid,
                status if status is not None else 0,
                extra=ledger_extra(
                    EventKind.FORWARDED,
                    sop_uid=obj.sop_instance_uid or None,
                    path=str(jf.path),
                    destination=destination,
                    status=f"0x{status or 0:04X}",
                    duration_ms=took_ms,
                ),
            )
        elif outcome is SendOutcome.REFUSED:
            why = ParkReason(status, reason, obj.sop_instance_uid)
            logger.warning(
                "SEND-FAILED group=%s file=%s sop_instance_uid=%s %s",
                label,
                jf.display,
                obj.sop_instance_uid,
                why.describe(),
                extra=ledger_extra(
                    EventKind.FORWARD_REFUSED,
                    sop_uid=obj.sop_instance_uid or None,
                    path=str(jf.path),
                    destination=destination,
                    status=f"0x{status:04X}" if status is not None else None,
                    reason=why.describe(),
                    duration_ms=took_ms,
                ),
            )
            if _is_unchanged(jf) and _park(job, jf, why, stamp):
                result.parked += 1
                counts.pop(jf.display, None)
        elif outcome is SendOutcome.RETRY:
            result.retry.append((jf, obj))
        elif outcome is SendOutcome.DEFERRED:
            resolve(False)
            pending = (obj, status, reason)
            return  # reported when settled
        if on_file_done:
            on_file_done()

    def check(obj: ObjectInfo) -> bool:
        if not _is_unchanged(by_key[obj.rel_path]):
            result.changed = True
            logger.info(
                "GROUP-CHANGED group=%s: %s changed, waiting for quiet", label, obj.rel_path
            )
            return False
        if pending is not None and rank(obj) > rank(pending[0]):
            resolve(None)  # nothing else of its kind is left to tell
        if unsettled_rank is not None and rank(obj) > unsettled_rank:
            # clinical order: nothing of a later kind before the earlier objects are
            # acknowledged or parked
            result.held = True
            logger.info(
                "HELD group=%s: %s waits until the object(s) the target refused are "
                "delivered or parked",
                label,
                obj.rel_path,
            )
            return False
        return True

    def locate(obj: ObjectInfo) -> Path:
        return by_key[obj.rel_path].path

    plans = plan_associations(ordered)
    for n, (objects, contexts) in enumerate(plans):
        end = sender.run(locate, objects, contexts, on_result, check, should_stop)
        if end.network_error is not None:
            result.network_error = end.network_error
            for later, _ in plans[n + 1 :]:
                for obj in later:
                    result.retry.append((by_key[obj.rel_path], obj))
            break
        if end.stopped:
            result.stopped = not result.changed and not result.held
            break
    resolve(None)
    if result.held:
        kept = {id(jf) for jf, _ in result.retry}
        for obj in ordered:
            jf = by_key[obj.rel_path]
            if obj.rel_path not in decided and id(jf) not in kept:
                result.retry.append((jf, obj))
    result.refusals = {
        jf.display: counts[jf.display] for jf, _ in result.retry if jf.display in counts
    }
    if result.network_error:
        logger.warning(
            "SEND-FAILED group=%s: %s (%d file(s) kept for retry)",
            label,
            result.network_error,
            len(result.retry),
        )
    return result


def _park(job: GroupJob, jf: JobFile, why: ParkReason, stamp: str) -> bool:
    return (
        park_file(
            jf.path,
            park_root=job.park_root,
            group=job.key,
            inside=jf.inside,
            display=jf.display,
            stamp=stamp,
            why=why,
            wall_time=time.time(),
            prune_root=job.prune_root,
        )
        is not None
    )


# --------------------------------------------------------------------------- service


class Forwarder:
    """Watch the configured folder and forward quiet groups to the target node.

    Parameters
    ----------
    config : ForwarderConfig
        Watch folder, target, timers, order, retry policy.
    ssl_context : ssl.SSLContext or None
        Client TLS context for the target; None for plain TCP.

    Raises
    ------
    ConfigError
        When no target is configured.
    """

    def __init__(self, config: ForwarderConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        if not config.has_target:
            raise ConfigError("[FolderWatcher] target_ip and target_aet are needed to forward")
        if config.transport == "pynetdicom":
            logger.warning(
                "DEPRECATED [FolderWatcher] transport = pynetdicom: that transport was retired; "
                "sending with the built-in one (same guarantees). Remove the key."
            )
        self.config = config
        self.ssl_context = ssl_context
        self.watch_folder = config.watch_folder
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._inflight: dict[str, Future[None]] = {}
        self._senders: set[AssociationSender] = set()
        self._tracker = ReadinessTracker(config.inactivity_timeout)
        self._store = StateStore(config.watch_folder)
        self._skips = SkipReport(config.watch_folder)
        self._retry: dict[str, RetryState] = {}
        self._events: EventSource | None = None
        self._scheduler: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._last_success: float | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the observer, the scheduler and the worker pool; return at once."""
        if self._scheduler is not None:
            return
        self.watch_folder.mkdir(parents=True, exist_ok=True)
        self._retry = self._store.load_all()
        self._stop.clear()
        self._pool = ThreadPoolExecutor(
            max_workers=self.config.max_workers, thread_name_prefix="dicomnode-forward"
        )
        if not self.config.use_polling:
            events = EventSource(self.watch_folder, self._on_event)
            if events.start():
                self._events = events
        self._scheduler = threading.Thread(
            target=self._run_scheduler, name="dicomnode-forward-scheduler", daemon=True
        )
        self._scheduler.start()
        logger.info(
            "FORWARDER-STARTED watch=%s target=%s@%s:%d inactivity=%gs rescan=%gs workers=%d%s",
            self.watch_folder,
            self.config.target_aet,
            self.config.target_ip,
            self.config.target_port,
            self.config.inactivity_timeout,
            self.config.process_timer_interval,
            self.config.max_workers,
            " (polling)" if self._events is None else "",
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop claiming groups and wait for in-flight sends.

        Sends still running after ``timeout_s`` are aborted. Files stay in the
        watch folder unless the target acknowledged them.
        """
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        if self._events is not None:
            self._events.stop()
            self._events = None
        if self._scheduler is not None:
            self._scheduler.join(max(0.1, deadline - time.monotonic()))
            self._scheduler = None
        with self._lock:
            futures = list(self._inflight.values())
        for fut in futures:
            with contextlib.suppress(Exception):
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            running = [f for f in self._inflight.values() if not f.done()]
            senders = list(self._senders)
        if running:
            logger.warning(
                "STOP-ABORT %d send(s) still running after %g s", len(running), timeout_s
            )
            for sender in senders:
                sender.abort()
            for fut in running:
                with contextlib.suppress(Exception):
                    fut.result(timeout=5.0)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        logger.info("FORWARDER-STOPPED watch=%s", self.watch_folder)

    # -- scheduler -----------------------------------------------------------------

    def _on_event(self, key: str) -> None:
        with self._lock:
            self._dirty.add(key)

    def _run_scheduler(self) -> None:
        cfg = self.config
        next_scan = 0.0
        next_heartbeat = time.monotonic() + cfg.heartbeat_interval
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_scan:
                    self._full_scan(now)
                    next_scan = now + cfg.process_timer_interval
                self._scan_dirty(now)
                self._dispatch(now)
                if now >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = now + cfg.heartbeat_interval
            except Exception:
                logger.exception("SCHEDULER-ERROR in %s (continuing)", self.watch_folder)
            self._wake.wait(min(_TICK_S, cfg.process_timer_interval))
            self._wake.clear()

    def _observe_group(self, key: str, entries: Sequence[FileEntry], now: float) -> None:
        snap = group_entries(entries).get(key)
        if snap is None:
            self._tracker.forget(key)
        elif self._tracker.observe(snap, now):
            logger.debug("group %s changed (%d files)", group_label(key), len(snap.files))

    def _full_scan(self, now: float) -> None:
        skipped: list[Skipped] = []
        groups = group_entries(scan_folder(self.watch_folder, skipped=skipped))
        self._skips.report(skipped)
        with self._lock:
            busy = set(self._inflight)
        for key in self._tracker.group_keys():
            if key not in groups and key not in busy:
                self._tracker.forget(key)
        for snap in groups.values():
            self._tracker.observe(snap, now)
        for key in list(self._retry):
            if key not in groups and key not in busy:
                self._retry.pop(key, None)
                self._store.clear(key)

    def _scan_dirty(self, now: float) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for key in dirty:
            self._observe_group(key, scan_folder(self.watch_folder, key), now)
            self._tracker.touch(key, now)

    def _dispatch(self, now: float) -> None:
        wall = time.time()
        for key in self._tracker.quiet_groups(now):
            with self._lock:
                if key in self._inflight:
                    continue
                if len(self._inflight) >= self.config.max_workers:
                    return
            state = self._retry.get(key)
            if state is not None and 0 < state.next_attempt - wall <= self.config.retry_max_delay_s:
                continue  # still backing off (a wait beyond the maximum means the clock jumped)
            fresh = group_entries(scan_folder(self.watch_folder, key)).get(key)
            if fresh is None:
                self._tracker.forget(key)
                continue
            if self._tracker.observe(fresh, now):
                continue
            if has_pending_conversion(self.watch_folder, key):
                self._tracker.touch(key, now)  # the receiver is still splitting an object
                continue
            job = job_from_snapshot(self.watch_folder, fresh)
            if self._pool is None or self._stop.is_set():
                return
            with self._lock:
                self._inflight[key] = self._pool.submit(self._work, job)

    # -- worker ------------------------------------------------------------------

    def _work(self, job: GroupJob) -> None:
        sender = make_sender(self.config, self.ssl_context)
        with self._lock:
            self._senders.add(sender)
        try:
            previous = self._retry.get(job.key)
            result = send_group(
                job,
                self.config,
                sender,
                self._stop.is_set,
                refusals=previous.refusals if previous is not None else None,
            )
            self._after(job, result)
        except Exception:
            logger.exception(
                "WORKER-ERROR group=%s (files stay, retried later)", group_label(job.key)
            )
        finally:
            with self._lock:
                self._senders.discard(sender)
                self._inflight.pop(job.key, None)
                self._dirty.add(job.key)
            self._wake.set()

    def _after(self, job: GroupJob, result: GroupResult) -> None:
        key = job.key
        label = group_label(key)
        if result.sent:
            self._last_success = time.time()
        reason = result.network_error
        if reason is None and (result.deferred or result.held):
            reason = (
                f"the target refused {result.deferred} object(s) temporarily while accepting "
                "others; they are retried (and parked after max_object_refusals refusals)"
            )
        if reason is None:
            if key in self._retry and not result.stopped:
                self._retry.pop(key, None)
                self._store.clear(key)
            if result.sent or result.parked:
                logger.info(
                    "GROUP-DONE group=%s sent=%d parked=%d%s",
                    label,
                    result.sent,
                    result.parked,
                    " (changed files wait for quiet)" if result.changed else "",
                )
            return
        wall = time.time()
        previous = self._retry.get(key)
        if previous is not None and result.sent == 0 and result.parked == 0:
            first, attempts = previous.first_failure, previous.attempts + 1
        else:
            first, attempts = wall, 1
        cfg = self.config
        if should_give_up(first, wall, cfg.give_up_after_s):
            reason = (
                f"network trouble for {wall - first:.0f} s over {attempts} attempt(s), "
                f"gave up after give_up_after_s={cfg.give_up_after_s:g}: {reason}"
            )
            stamp = park_stamp(wall)
            for jf, obj in result.retry:
                why = ParkReason(None, reason, obj.sop_instance_uid if obj else "")
                if _is_unchanged(jf):
                    _park(job, jf, why, stamp)
            self._retry.pop(key, None)
            self._store.clear(key)
            return
        delay = backoff_delay_s(attempts, cfg.retry_initial_delay_s, cfg.retry_max_delay_s)
        state = RetryState(key, first, attempts, wall + delay, reason, dict(result.refusals))
        self._retry[key] = state
        self._store.save(state)
        logger.warning(
            "RETRY-SCHEDULED group=%s files=%d attempt=%d in=%gs give_up_in=%.0fs reason=%s",
            label,
            len(result.retry),
            attempts,
            delay,
            max(0.0, first + cfg.give_up_after_s - wall),
            reason,
            extra=ledger_extra(
                EventKind.RETRIED,
                destination=f"{cfg.target_aet}@{cfg.target_ip}:{cfg.target_port}",
                path=str(self.watch_folder / key) if key else str(self.watch_folder),
                reason=f"attempt {attempts}, next in {delay:g} s: {reason}",
                size=len(result.retry),
            ),
        )

    def status(self) -> dict[str, object]:
        """Return what the console and /healthz show: groups waiting, sending, backing off.

        Keys: ``running`` (scheduler alive), ``sending`` (group keys), ``retry``
        (group key -> :class:`~.state.RetryState`), ``last_success`` (wall time or None).
        """
        with self._lock:
            sending = sorted(self._inflight)
        scheduler = self._scheduler
        return {
            "running": scheduler is not None and scheduler.is_alive(),
            "sending": sending,
            "retry": dict(self._retry),
            "last_success": self._last_success,
        }

    def _heartbeat(self) -> None:
        groups = self._tracker.group_keys()
        files = 0
        for key in groups:
            snap = self._tracker.snapshot(key)
            files += len(snap.files) if snap else 0
        wall = time.time()
        backoff = max((s.next_attempt - wall for s in self._retry.values()), default=0.0)
        last = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self._last_success))
            if self._last_success
            else "never"
        )
        with self._lock:
            inflight = len(self._inflight)
        logger.info(
            "HEARTBEAT pending_groups=%d files=%d sending=%d retrying=%d last_success=%s backoff=%.0fs",
            len(groups),
            files,
            inflight,
            len(self._retry),
            last,
            max(0.0, backoff),
        )


# --------------------------------------------------------------------------- one-shot


def _collect(paths: Sequence[Path]) -> list[GroupJob] | str:
    """Turn ``send`` arguments into jobs: one per folder, one for all loose files."""
    from dicomnode.forwarder.batching import TEMP_SUFFIXES

    jobs: list[GroupJob] = []
    loose: list[JobFile] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            return f"{path}: no such file or folder"
        if path.is_file():
            st = path.stat()
            loose.append(
                JobFile(path, str(path), PurePosixPath(path.name), st.st_size, st.st_mtime_ns)
            )
            continue
        files: list[JobFile] = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES):
                    continue
                fp = Path(dirpath) / name
                try:
                    st = fp.stat()
                except OSError:
                    continue
                inside = PurePosixPath(*fp.relative_to(path).parts)
                files.append(JobFile(fp, str(fp), inside, st.st_size, st.st_mtime_ns))
        if files:
            jobs.append(GroupJob(path.resolve().name or "send", tuple(files), Path(), path))
    if loose:
        jobs.append(GroupJob(TOPLEVEL_GROUP, tuple(loose), Path(), Path(loose[0].path).parent))
    return jobs


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled and total > 0

    def step(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} files")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def send_paths(
    paths: Sequence[Path],
    config: ForwarderConfig,
    progress: bool,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Send files and folders to the target now (``dicomnode send PATH...``).

    Each folder argument is one group, all file arguments together another; the
    same order and per-file outcome rules as the watcher apply, without a quiet
    wait: delivered files are deleted, refused ones are parked in
    ``<watch_folder>/failed/`` with a ``send_errors.log`` line, and on network
    trouble the undelivered files stay where they are.

    Parameters
    ----------
    paths : sequence of Path
        Files and folders.
    config : ForwarderConfig
        Target, timeouts, send order and watch folder (for failed/).
    progress : bool
        Draw a progress bar on stderr (pass True only for a terminal).
    ssl_context : ssl.SSLContext or None
        Client TLS context.

    Returns
    -------
    int
        0 when every file was delivered, 1 otherwise (2 when no target is set).
    """
    if not config.has_target:
        logger.error("send: no target (target_ip/target_aet) configured")
        return int(ExitStatus.CONFIG_ERROR)
    collected = _collect(paths)
    if isinstance(collected, str):
        logger.error("send: %s", collected)
        return int(ExitStatus.FAILURE)
    jobs = [GroupJob(j.key, j.files, config.watch_folder, j.prune_root) for j in collected]
    total = sum(len(j.files) for j in jobs)
    bar = _Progress(total, progress)
    sender = make_sender(config, ssl_context)
    sent = 0
    failed = False
    try:
        for job in jobs:
            result = send_group(job, config, sender, lambda: False, bar.step)
            sent += result.sent
            if result.network_error or result.parked or result.changed or result.retry:
                failed = True
    finally:
        bar.close()
    logger.info("SEND-DONE %d of %d file(s) delivered", sent, total)
    return int(ExitStatus.FAILURE if failed or sent < total else ExitStatus.OK)


def retry_failed(config: ForwarderConfig) -> int:
    """Move parked files back into the watch folder (``dicomnode retry-failed``).

    ``failed/<stamp>_<group>/<path>`` returns to ``<watch_folder>/<group>/<path>``;
    an existing file is never overwritten (that file stays parked).

    Returns
    -------
    int
        0 when every parked file was moved back, 1 when some had to stay.
    """
    report = move_back_failed(config.watch_folder)
    logger.info(
        "RETRY-FAILED moved=%d kept=%d into %s", report.moved, report.kept, config.watch_folder
    )
    return int(ExitStatus.OK if report.kept == 0 else ExitStatus.FAILURE)

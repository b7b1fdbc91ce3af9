"""The long-running forwarder: watch, decide readiness, claim quiet groups, deliver, retry.

:class:`Forwarder` owns three kinds of threads: the watchdog observer (via
:class:`~.watcher.EventSource`, unless polling), one scheduler that rescans,
decides readiness with :class:`~.batching.ReadinessTracker` and claims quiet
groups, and ``max_workers`` workers that each deliver one group
(:func:`~.delivery.send_group`). Every per-file decision is applied on disk
immediately, so a kill at any moment loses nothing; network failures are
recorded in :class:`~.state.StateStore` and retried with exponential backoff
until ``give_up_after_s``. Log verbs: ``BATCH-READY``, ``RETRY-SCHEDULED``,
``HEARTBEAT`` (plus those of :mod:`.delivery`).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

from dicomnode.config import DestinationConfig, ForwarderConfig
from dicomnode.errors import ConfigError
from dicomnode.forwarder.batching import (
    FileEntry,
    ReadinessTracker,
    backoff_delay_s,
    group_entries,
    group_label,
    should_give_up,
)
from dicomnode.forwarder.delivery import make_sender, park_job_file, send_group
from dicomnode.forwarder.job import GroupJob, GroupResult, is_unchanged, job_from_snapshot
from dicomnode.forwarder.outcome import ParkReason, park_stamp
from dicomnode.forwarder.rtgate import DEFAULT_DESTINATION, RtGate
from dicomnode.forwarder.sender import AssociationSender
from dicomnode.forwarder.state import RetryState, StateStore
from dicomnode.forwarder.watcher import (
    EventSource,
    Skipped,
    SkipReport,
    has_pending_conversion,
    scan_folder,
)
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.ledger.queries import DeliveryLookup

logger = logging.getLogger(__name__)

_TICK_S: Final = 0.2


class Forwarder:
    """Watch the configured folder and forward quiet groups to the target node.

    Parameters
    ----------
    config : ForwarderConfig
        Watch folder, target, timers, order, retry policy.
    ssl_context : ssl.SSLContext or None
        Client TLS context for the target; None for plain TCP.
    destinations : sequence of DestinationConfig
        ``[Destination:NAME]`` sections (their ``rt_completeness_wait_s``).
    delivered : DeliveryLookup, optional
        The ledger's record of earlier deliveries, for the RT completeness gate.

    Raises
    ------
    ConfigError
        When no target is configured.
    """

    def __init__(
        self,
        config: ForwarderConfig,
        ssl_context: ssl.SSLContext | None = None,
        destinations: Sequence[DestinationConfig] = (),
        delivered: DeliveryLookup | None = None,
    ) -> None:
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
        self._rt = RtGate(config, destinations, delivered)

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
                self._rt.forget(key)
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
            if self._rt.should_hold(key, self._tracker.snapshot(key), DEFAULT_DESTINATION):
                continue  # waits, unchanged, for the RT objects it references
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
                max_associations=self.config.max_associations,
                gate=self._rt.for_destination(DEFAULT_DESTINATION),
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
        if result.waiting:
            return  # held by the RT completeness gate: nothing was tried
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
                if is_unchanged(jf):
                    park_job_file(job, jf, why, stamp)
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
        (group key -> :class:`~.state.RetryState`), ``last_success`` (wall time or None),
        ``waiting`` (group key -> what the RT completeness gate waits for).
        """
        with self._lock:
            sending = sorted(self._inflight)
        scheduler = self._scheduler
        return {
            "running": scheduler is not None and scheduler.is_alive(),
            "sending": sending,
            "retry": dict(self._retry),
            "last_success": self._last_success,
            "waiting": self._rt.waiting(),
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

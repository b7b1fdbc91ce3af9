"""The long-running forwarder: watch, decide readiness, claim quiet groups, route, deliver, retry.

:class:`Forwarder` owns the watchdog observer (via :class:`~.watcher.EventSource`,
unless polling), one scheduler thread that rescans, decides readiness with
:class:`~.batching.ReadinessTracker` and claims quiet groups, a pool of planners
that read a claimed group's files and route them (:func:`~.plan.plan_file`), and
one pool of workers *per destination* that deliver a group's share to that
destination (:func:`~.delivery.send_group`). Destinations never wait for each
other: each has its own workers, retry state (:class:`~.state.StateStore`) and
backoff. Every per-destination outcome is committed to the
:class:`~.deliveries.DeliveryStore` before the next object goes to that
destination; a file leaves the watch folder when every destination it was
routed to acknowledged it, refused it (a copy parked under
``failed/<destination>/``) or already had it (duplicate); a destination with
``storage_commitment`` gets the file handed to its
:class:`~.commitkeeper.CommitmentKeeper` on acknowledgement (moved, or linked
when other destinations still need it), which holds it until it is
committed. With no
``[Route:NAME]`` sections everything goes to ``default`` and refused files are
moved to ``failed/<stamp>_<group>/`` as before. Log verbs: ``BATCH-READY``,
``RETRY-SCHEDULED``, ``SKIPPED-DUPLICATE``, ``HEARTBEAT`` (plus those of
:mod:`.delivery`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Final

from dicomnode.config import (
    COMMITMENT_STORE_NAME,
    DEFAULT_DESTINATION,
    DestinationConfig,
    ForwarderConfig,
)
from dicomnode.errors import ConfigError
from dicomnode.forwarder.batching import (
    FileEntry,
    ObjectInfo,
    ReadinessTracker,
    backoff_delay_s,
    group_entries,
    group_label,
    should_give_up,
)
from dicomnode.forwarder.commitkeeper import CommitmentKeeper
from dicomnode.forwarder.deliveries import STORE_NAME, DeliveryStore
from dicomnode.forwarder.delivery import make_sender, park_job_file, send_group
from dicomnode.forwarder.fanout import Action, DeliveryState, is_settled, next_action
from dicomnode.forwarder.holding import Batch, unclaimed_batches
from dicomnode.forwarder.job import GroupJob, GroupResult, JobFile, is_unchanged, job_from_snapshot
from dicomnode.forwarder.outcome import ParkReason, delete_delivered, park_stamp
from dicomnode.forwarder.plan import FilePlan, plan_file
from dicomnode.forwarder.rtgate import RtGate
from dicomnode.forwarder.sender import AssociationSender
from dicomnode.forwarder.state import STATE_DIR_NAME, RetryState, StateStore
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
#: Delivery records of files that left the watch folder are kept at least this long.
_KEEP_RECORDS_S: Final = 7 * 86400.0
_PRUNE_EVERY_S: Final = 3600.0

#: (group key, destination name)
Lane = tuple[str, str]


class Forwarder:
    """Watch the configured folder and forward quiet groups to their destinations.

    Parameters
    ----------
    config : ForwarderConfig
        Watch folder, destinations, routes, timers, order, retry policy.
    ssl_context : ssl.SSLContext or None
        Client TLS context for every destination when ``contexts`` is None.
    contexts : mapping of str to ssl.SSLContext or None, optional
        Client TLS context per destination name (None: plain TCP).
    destinations : sequence of DestinationConfig
        For the RT completeness gate's waits; default: the configuration's destinations.
    delivered : DeliveryLookup, optional
        The ledger's record of earlier deliveries, for the RT completeness gate.

    Raises
    ------
    ConfigError
        When no destination is configured.
    """

    def __init__(
        self,
        config: ForwarderConfig,
        ssl_context: ssl.SSLContext | None = None,
        contexts: Mapping[str, ssl.SSLContext | None] | None = None,
        destinations: Sequence[DestinationConfig] = (),
        delivered: DeliveryLookup | None = None,
    ) -> None:
        if not config.forwards:
            raise ConfigError(
                "[FolderWatcher] target_ip and target_aet (or [Route:NAME] sections) "
                "are needed to forward"
            )
        if config.transport == "pynetdicom":
            logger.warning(
                "DEPRECATED [FolderWatcher] transport = pynetdicom: that transport was retired; "
                "sending with the built-in one (same guarantees). Remove the key."
            )
        self.config = config
        self.ssl_context = ssl_context
        self.watch_folder = config.watch_folder
        self.routed = bool(config.routes)
        self._dests: dict[str, DestinationConfig] = {
            d.name: d for d in config.routed_destinations()
        }
        self._dest_cfg = {n: config.for_destination(d) for n, d in self._dests.items()}
        self._contexts = {
            n: (contexts.get(n) if contexts is not None else ssl_context) for n in self._dests
        }
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._settle_lock = threading.Lock()
        self._dirty: set[str] = set()
        self._planning: dict[str, Future[None]] = {}
        self._inflight: dict[Lane, Future[None]] = {}
        #: group -> destination -> files that destination still needs (latest plan)
        self._awaiting: dict[str, dict[str, int]] = {}
        #: groups whose latest plan is stale (changed, or a destination finished a share)
        self._replan: set[str] = set()
        self._senders: set[AssociationSender] = set()
        self._tracker = ReadinessTracker(config.inactivity_timeout)
        self._stores = {
            n: StateStore(config.watch_folder, "" if n == DEFAULT_DESTINATION else n)
            for n in self._dests
        }
        self._deliveries: DeliveryStore | None = None
        self._skips = SkipReport(config.watch_folder)
        self._retry: dict[Lane, RetryState] = {}
        self._events: EventSource | None = None
        self._scheduler: threading.Thread | None = None
        self._planner: ThreadPoolExecutor | None = None
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._last_success: float | None = None
        self._next_prune = 0.0
        self._keepers = {
            n: CommitmentKeeper(self._dest_cfg[n], d, self._contexts[n])
            for n, d in self._dests.items()
            if d.storage_commitment
        }
        for keeper in self._keepers.values():
            keeper.deliveries = lambda: self._deliveries
        self._rt = RtGate(config, destinations or config.all_destinations(), delivered)

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the observer, the scheduler, the planners and each destination's workers."""
        if self._scheduler is not None:
            return
        cfg = self.config
        self.watch_folder.mkdir(parents=True, exist_ok=True)
        self._deliveries = DeliveryStore(self.watch_folder / STATE_DIR_NAME / STORE_NAME)
        self._retry = {
            (group, name): state
            for name, store in self._stores.items()
            for group, state in store.load_all().items()
        }
        self._stop.clear()
        for keeper in self._keepers.values():
            keeper.start()
        orphaned = unclaimed_batches(self.watch_folder, set(self._keepers))
        for name, files in sorted(orphaned.items()):
            logger.warning(
                "COMMIT-AWAITING role=scu destination=%s files=%d: held for a destination that no "
                "longer asks for storage commitment; they stay in %s/held until it does again",
                name,
                files,
                COMMITMENT_STORE_NAME,
            )
        self._planner = ThreadPoolExecutor(
            max_workers=cfg.max_workers, thread_name_prefix="dicomnode-plan"
        )
        self._pools = {
            name: ThreadPoolExecutor(
                max_workers=cfg.max_workers, thread_name_prefix=f"dicomnode-forward-{name}"
            )
            for name in self._dests
        }
        if not cfg.use_polling:
            events = EventSource(self.watch_folder, self._on_event)
            if events.start():
                self._events = events
        self._scheduler = threading.Thread(
            target=self._run_scheduler, name="dicomnode-forward-scheduler", daemon=True
        )
        self._scheduler.start()
        targets = ", ".join(
            (f"{n}=" if self.routed or n != DEFAULT_DESTINATION else "") + d.address
            for n, d in self._dests.items()
        )
        logger.info(
            "FORWARDER-STARTED watch=%s target=%s inactivity=%gs rescan=%gs workers=%d%s%s",
            self.watch_folder,
            targets,
            cfg.inactivity_timeout,
            cfg.process_timer_interval,
            cfg.max_workers,
            f" routes={len(cfg.routes)}" if self.routed else "",
            " (polling)" if self._events is None else "",
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop claiming groups and wait for in-flight sends.

        Sends still running after ``timeout_s`` are aborted. Files stay in the
        watch folder unless every destination they were routed to is done with them.
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
            futures = list(self._planning.values()) + list(self._inflight.values())
        for fut in futures:
            with contextlib.suppress(Exception):
                fut.result(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            running = [
                f for f in [*self._planning.values(), *self._inflight.values()] if not f.done()
            ]
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
        for pool in [self._planner, *self._pools.values()]:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._planner = None
        self._pools = {}
        for keeper in self._keepers.values():
            keeper.stop(max(1.0, deadline - time.monotonic()))
        if self._deliveries is not None:
            with contextlib.suppress(sqlite3.Error):
                self._deliveries.close()
            self._deliveries = None
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
            self._replan.add(key)
            logger.debug("group %s changed (%d files)", group_label(key), len(snap.files))

    def _busy_groups(self) -> set[str]:
        with self._lock:
            return set(self._planning) | {g for g, _ in self._inflight}

    def _full_scan(self, now: float) -> None:
        skipped: list[Skipped] = []
        groups = group_entries(scan_folder(self.watch_folder, skipped=skipped))
        self._skips.report(skipped)
        busy = self._busy_groups()
        for key in self._tracker.group_keys():
            if key not in groups and key not in busy:
                self._tracker.forget(key)
                self._awaiting.pop(key, None)
                self._replan.discard(key)
                self._rt.forget(key)
        for snap in groups.values():
            if self._tracker.observe(snap, now):
                self._replan.add(snap.key)
        for lane in list(self._retry):
            if lane[0] not in groups and lane[0] not in busy:
                self._retry.pop(lane, None)
                self._stores[lane[1]].clear(lane[0])
        wall = time.time()
        if wall >= self._next_prune and self._deliveries is not None:
            self._next_prune = wall + _PRUNE_EVERY_S
            keep = max(_KEEP_RECORDS_S, self.config.duplicate_window_s)
            with contextlib.suppress(sqlite3.Error, OSError):
                removed = self._deliveries.prune(wall - keep, self.watch_folder)
                if removed:
                    logger.info("DELIVERY-RECORDS-PRUNED rows=%d older_than=%gs", removed, keep)

    def _scan_dirty(self, now: float) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for key in dirty:
            self._observe_group(key, scan_folder(self.watch_folder, key), now)
            self._tracker.touch(key, now)

    def _backing_off(self, lane: Lane, wall: float) -> bool:
        state = self._retry.get(lane)
        limit = self._dest_cfg[lane[1]].retry_max_delay_s
        # a wait beyond the maximum means the clock jumped
        return state is not None and 0 < state.next_attempt - wall <= limit

    def _waiting(self, lane: Lane, wall: float) -> bool:
        """True while ``lane`` is being sent, backing off or held for RT objects (lock held)."""
        return (
            lane in self._inflight
            or self._backing_off(lane, wall)
            or self._rt.should_hold(lane[0], self._tracker.snapshot(lane[0]), lane[1])
        )

    def _dispatch(self, now: float) -> None:
        wall = time.time()
        for key in self._tracker.quiet_groups(now):
            with self._lock:
                if key in self._planning:
                    continue
                if len(self._planning) >= self.config.max_workers:
                    return
                needed = [d for d, n in self._awaiting.get(key, {}).items() if n]
                if (
                    key not in self._replan
                    and needed
                    and all(self._waiting((key, d), wall) for d in needed)
                ):
                    continue  # every destination that needs it is busy with it or backing off
            fresh = group_entries(scan_folder(self.watch_folder, key)).get(key)
            if fresh is None:
                self._tracker.forget(key)
                continue
            if self._tracker.observe(fresh, now):
                self._replan.add(key)
                continue
            if has_pending_conversion(self.watch_folder, key):
                self._tracker.touch(key, now)  # the receiver is still splitting an object
                continue
            job = job_from_snapshot(self.watch_folder, fresh)
            if self._planner is None or self._stop.is_set():
                return
            with self._lock:
                self._replan.discard(key)
                self._planning[key] = self._planner.submit(self._plan, job)

    # -- planner -----------------------------------------------------------------

    def _plan(self, job: GroupJob) -> None:
        """Route a claimed group's files and hand each destination its share."""
        try:
            self._route_and_submit(job)
        except Exception:
            logger.exception(
                "WORKER-ERROR group=%s (files stay, retried later)", group_label(job.key)
            )
        finally:
            with self._lock:
                self._planning.pop(job.key, None)
            self._wake.set()

    def _route_and_submit(self, job: GroupJob) -> None:
        cfg = self.config
        store = self._deliveries
        if store is None:
            return
        stamp = park_stamp(time.time())
        label = group_label(job.key)
        plans: list[FilePlan] = []
        for index, jf in enumerate(job.files):
            if self._stop.is_set():
                return
            key = PurePosixPath(str(index), *jf.inside.parts)
            found = plan_file(jf, key, job.key, cfg)
            if isinstance(found, ParkReason):
                if is_unchanged(jf):
                    park_job_file(job, jf, found, stamp)
                continue
            if not found.route.destinations:
                why = ParkReason(None, found.route.reason, found.info.sop_instance_uid)
                if is_unchanged(jf):
                    park_job_file(job, jf, why, stamp)
                continue
            plans.append(found)
        shares: dict[str, list[FilePlan]] = {}
        window = cfg.duplicate_window_s
        for fp in plans:
            wall = time.time()
            states = store.states(fp.ident)
            for name in fp.route.destinations:
                recorded = states.get(name)
                last = (
                    store.last_acknowledged(name, fp.ident.sop_uid, fp.ident.checksum)
                    if recorded is None and window > 0
                    else None
                )
                action = next_action(recorded, last, wall, window)
                if action is Action.SKIP_DUPLICATE:
                    store.record(name, fp.ident, DeliveryState.DUPLICATE, wall)
                    states[name] = DeliveryState.DUPLICATE
                    self._log_duplicate(job, fp, name, last or wall)
                elif action is Action.SEND:
                    shares.setdefault(name, []).append(fp)
            self._settle(job, fp, states)
        with self._lock:
            self._awaiting[job.key] = {name: len(fps) for name, fps in shares.items()}
        wall = time.time()
        for name, fps in shares.items():
            lane = (job.key, name)
            with self._lock:
                pool = self._pools.get(name)
                if pool is None or self._stop.is_set() or self._waiting(lane, wall):
                    continue
                share = GroupJob(job.key, tuple(fp.jf for fp in fps), job.park_root, job.prune_root)
                by_path = {fp.jf.path: fp for fp in fps}
                self._inflight[lane] = pool.submit(self._work, share, name, by_path, job)
        if len(shares) > 1 or self.routed:
            logger.debug(
                "ROUTED group=%s files=%d shares=%s",
                label,
                len(plans),
                ",".join(f"{n}:{len(f)}" for n, f in shares.items()) or "-",
            )

    def _log_duplicate(
        self, job: GroupJob, fp: FilePlan, name: str, acknowledged_at: float
    ) -> None:
        dest = self._dests[name]
        logger.info(
            "SKIPPED-DUPLICATE group=%s file=%s sop_instance_uid=%s destination=%s: "
            "acknowledged with the same content %.0f s ago (duplicate_window_s=%g)",
            group_label(job.key),
            fp.jf.display,
            fp.ident.sop_uid,
            name,
            max(0.0, time.time() - acknowledged_at),
            self.config.duplicate_window_s,
            extra=ledger_extra(
                EventKind.SKIPPED_DUPLICATE,
                sop_uid=fp.ident.sop_uid or None,
                path=str(fp.jf.path),
                destination=dest.address,
                checksum=fp.ident.checksum,
            ),
        )

    def _settle(self, job: GroupJob, fp: FilePlan, states: Mapping[str, DeliveryState]) -> None:
        """Delete ``fp``'s file once every destination it was routed to is done with it."""
        if not is_settled(fp.route.destinations, states):
            return
        with self._settle_lock:
            if is_unchanged(fp.jf):
                delete_delivered(fp.jf.path, job.prune_root)

    # -- worker ------------------------------------------------------------------

    def _work(
        self, job: GroupJob, name: str, plans: Mapping[Path, FilePlan], whole: GroupJob
    ) -> None:
        """Send ``job`` (``name``'s share of the claimed group ``whole``) to destination ``name``."""
        lane = (job.key, name)
        cfg = self._dest_cfg[name]
        sender = make_sender(cfg, self._contexts[name])
        with self._lock:
            self._senders.add(sender)
        keeper = self._keepers.get(name)
        batch = keeper.open_batch(job.key) if keeper is not None else None
        result: GroupResult | None = None
        try:
            previous = self._retry.get(lane)
            try:
                result = send_group(
                    job,
                    cfg,
                    sender,
                    self._stop.is_set,
                    refusals=previous.refusals if previous is not None else None,
                    apply=_DestinationApplier(self, job, name, plans, batch),
                    name=name if self.routed else "",
                    known={path: fp.info for path, fp in plans.items()},
                    max_associations=self._dests[name].max_associations,
                    gate=lambda share, objects: self._rt.check(share, objects, name, whole=whole),
                )
            finally:
                if batch is not None:
                    batch.close()  # the record is on disk before any N-ACTION
            self._after(job, result, name, plans)
        except Exception:
            logger.exception(
                "WORKER-ERROR group=%s%s (files stay, retried later)",
                group_label(job.key),
                f" destination={name}" if self.routed else "",
            )
        finally:
            with self._lock:
                self._senders.discard(sender)
                self._inflight.pop(lane, None)
                shares = self._awaiting.get(job.key)
                if shares is not None and result is not None and not result.waiting:
                    shares[name] = len(result.retry)  # until the next plan counts again
                self._replan.add(job.key)
                self._dirty.add(job.key)
            self._wake.set()

    def _record(
        self, name: str, fp: FilePlan, state: DeliveryState
    ) -> dict[str, DeliveryState] | None:
        """Commit ``state`` of ``fp`` for ``name``; return the file's states, None on failure."""
        store = self._deliveries
        if store is None:
            return None
        try:
            store.record(name, fp.ident, state, time.time())
            if fp.route.destinations == (name,):
                return {name: state}  # its only destination: nothing else to look up
            return store.states(fp.ident)
        except sqlite3.Error as exc:
            logger.error(
                "STATE-WRITE-FAILED file=%s destination=%s: %s (the file stays; it may be "
                "sent to this destination again)",
                fp.jf.display,
                name,
                exc,
            )
            return None

    def _park_for(
        self,
        job: GroupJob,
        jf: JobFile,
        name: str,
        plans: Mapping[Path, FilePlan],
        why: ParkReason,
        stamp: str,
    ) -> bool:
        """Park what ``name`` refused: moved (single target) or a copy under failed/<name>/."""
        fp = plans.get(jf.path)
        if not self.routed or fp is None:
            return park_job_file(job, jf, why, stamp)
        alone = fp.route.destinations == (name,)
        if not park_job_file(job, jf, why, stamp, destination=name, copy=not alone):
            return False
        states = self._record(name, fp, DeliveryState.REFUSED)
        if states is not None and not alone:
            self._settle(job, fp, states)
        return True

    def _after(
        self, job: GroupJob, result: GroupResult, name: str, plans: Mapping[Path, FilePlan]
    ) -> None:
        key = job.key
        lane = (key, name)
        label = group_label(key)
        cfg = self._dest_cfg[name]
        store = self._stores[name]
        suffix = f" destination={name}" if self.routed else ""
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
            if lane in self._retry and not result.stopped:
                self._retry.pop(lane, None)
                store.clear(key)
            if result.sent or result.parked:
                logger.info(
                    "GROUP-DONE group=%s sent=%d parked=%d%s%s",
                    label,
                    result.sent,
                    result.parked,
                    " (changed files wait for quiet)" if result.changed else "",
                    suffix,
                )
            return
        wall = time.time()
        previous = self._retry.get(lane)
        if previous is not None and result.sent == 0 and result.parked == 0:
            first, attempts = previous.first_failure, previous.attempts + 1
        else:
            first, attempts = wall, 1
        if should_give_up(first, wall, cfg.give_up_after_s):
            reason = (
                f"network trouble for {wall - first:.0f} s over {attempts} attempt(s), "
                f"gave up after give_up_after_s={cfg.give_up_after_s:g}: {reason}"
            )
            stamp = park_stamp(wall)
            for jf, obj in result.retry:
                why = ParkReason(None, reason, obj.sop_instance_uid if obj else "")
                if is_unchanged(jf):
                    self._park_for(job, jf, name, plans, why, stamp)
            self._retry.pop(lane, None)
            store.clear(key)
            return
        delay = backoff_delay_s(attempts, cfg.retry_initial_delay_s, cfg.retry_max_delay_s)
        state = RetryState(key, first, attempts, wall + delay, reason, dict(result.refusals))
        self._retry[lane] = state
        store.save(state)
        logger.warning(
            "RETRY-SCHEDULED group=%s files=%d attempt=%d in=%gs give_up_in=%.0fs reason=%s%s",
            label,
            len(result.retry),
            attempts,
            delay,
            max(0.0, first + cfg.give_up_after_s - wall),
            reason,
            suffix,
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

        Keys: ``running`` (scheduler alive), ``sending`` (group keys),
        ``retry`` (group key -> :class:`~.state.RetryState`, the earliest failing
        destination's), ``last_success`` (wall time or None), and
        ``destinations``: per destination name, ``address``, ``sending`` (group
        keys), ``retry`` (group key -> RetryState), ``awaiting_files`` and
        ``awaiting_groups`` (what it still needs, as of the latest plans);
        ``waiting`` (group key -> what the RT completeness gate waits for);
        ``awaiting_commitment``: per committing destination, the files held until
        it commits them.
        """
        with self._lock:
            lanes = list(self._inflight)
            awaiting = {g: dict(d) for g, d in self._awaiting.items()}
        retry = dict(self._retry)
        scheduler = self._scheduler
        by_group: dict[str, RetryState] = {}
        for (group, _name), state in sorted(retry.items(), key=lambda i: i[1].first_failure):
            by_group.setdefault(group, state)
        destinations: dict[str, dict[str, object]] = {}
        for name, dest in self._dests.items():
            destinations[name] = {
                "address": dest.address,
                "sending": sorted(g for g, n in lanes if n == name),
                "retry": {g: st for (g, n), st in retry.items() if n == name},
                "awaiting_files": sum(d.get(name, 0) for d in awaiting.values()),
                "awaiting_groups": sum(1 for d in awaiting.values() if d.get(name)),
            }
        return {
            "running": scheduler is not None and scheduler.is_alive(),
            "sending": sorted({g for g, _ in lanes}),
            "retry": by_group,
            "last_success": self._last_success,
            "destinations": destinations,
            "waiting": self._rt.waiting(),
            "awaiting_commitment": {n: k.awaiting().get(n, 0) for n, k in self._keepers.items()},
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
            inflight = len({g for g, _ in self._inflight})
        per_destination = ""
        if self.routed:
            status = self.status()["destinations"]
            assert isinstance(status, dict)
            per_destination = " destinations=" + ",".join(
                f"{name}:awaiting={s['awaiting_files']}/sending={len(s['sending'])}"
                f"/retrying={len(s['retry'])}"
                for name, s in status.items()
            )
        logger.info(
            "HEARTBEAT pending_groups=%d files=%d sending=%d retrying=%d last_success=%s "
            "backoff=%.0fs%s",
            len(groups),
            files,
            inflight,
            len({g for g, _ in self._retry}),
            last,
            max(0.0, backoff),
            per_destination
            + (
                " awaiting_commitment="
                + ",".join(f"{n}:{k.awaiting().get(n, 0)}" for n, k in self._keepers.items())
                if self._keepers
                else ""
            ),
        )


class _DestinationApplier:
    """Outcomes of one destination's share: record first, then delete or park per destination."""

    def __init__(
        self,
        forwarder: Forwarder,
        job: GroupJob,
        name: str,
        plans: Mapping[Path, FilePlan],
        batch: Batch | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.job = job
        self.name = name
        self.plans = plans
        self.batch = batch

    def delivered(self, jf: JobFile, obj: ObjectInfo) -> Path | None:
        """Commit ``acknowledged`` for this destination; delete the file when it is settled.

        For a committing destination the file is first handed to its keeper
        (moved when no other destination needs it, else linked or copied): the
        keeper holds it until it is committed. When that fails nothing is
        recorded and the file is sent to this destination again.
        """
        fp = self.plans.get(jf.path)
        if self.batch is not None:
            alone = fp is None or fp.route.destinations == (self.name,)
            checksum = fp.ident.checksum if fp is not None else ""
            if not self.batch.hold(jf, obj, move=alone, checksum=checksum):
                return None
            if fp is None:
                return None
        if fp is None:  # not planned (cannot happen): behave like the single target
            delete_delivered(jf.path, self.job.prune_root)
            return None
        states = self.forwarder._record(self.name, fp, DeliveryState.ACKNOWLEDGED)
        if states is not None:
            self.forwarder._settle(self.job, fp, states)
        return None

    def refused(self, jf: JobFile, why: ParkReason, stamp: str) -> bool:
        """Park the file (or a copy) for this destination and record ``refused``."""
        return self.forwarder._park_for(self.job, jf, self.name, self.plans, why, stamp)

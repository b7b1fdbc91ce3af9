"""Run the receiver in several processes that share one listening socket (pre-fork).

Python's GIL lets one process use about one core (bench/README.md has the
CPU cost per C-STORE that makes more processes worth it). The parent binds
the port once (a second node on the same port still fails with "address in
use"), then spawns worker processes that accept on the inherited socket; the kernel hands each new connection to
whichever worker is waiting. Workers log through a pipe to the parent's
handlers (one writer per log file), stop when the parent asks or dies
(Linux: ``PR_SET_PDEATHSIG``), and are restarted if they crash.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

from dicomnode.codecs import keep_codecs_out
from dicomnode.config import NodeConfig, ReceiverConfig
from dicomnode.errors import DicomNodeError

logger = logging.getLogger(__name__)

_MAX_AUTO_PROCESSES = 4
#: A worker sends INFO log lines to the parent at least this often (seconds) ...
_LOG_BATCH_S = 0.05
#: ... or when this many are pending; WARNING and above go at once.
_LOG_BATCH_RECORDS = 64
#: Longest wait for a stopped worker's last log lines to be handled (a busy machine is slow).
_PUMP_DRAIN_S = 30.0


def effective_processes(cfg: ReceiverConfig) -> int:
    """Return how many receiver processes to run for ``receiver_processes``.

    0 (``auto``) means one per CPU, at most 4, on POSIX, and 1 on Windows.
    """
    if cfg.receiver_processes > 0:
        return cfg.receiver_processes
    if sys.platform == "win32":
        return 1
    return max(1, min(os.cpu_count() or 1, _MAX_AUTO_PROCESSES))


def bind_listening_socket(cfg: ReceiverConfig) -> socket.socket:
    """Bind and listen on ``server_ip:receive_port`` (SO_REUSEADDR, not SO_REUSEPORT).

    Raises
    ------
    OSError
        When the address is in use or not local.
    """
    family = socket.AF_INET6 if ":" in cfg.server_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cfg.server_ip, cfg.receive_port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (kill -9 of the node)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_converter(cfg: NodeConfig, resume: bool) -> tuple[Any, Any]:
    """Start the Enhanced MR conversion worker if enabled.

    Returns
    -------
    tuple
        ``(worker, post_store hook)``, or ``(None, None)`` when conversion is off
        or unavailable.
    """
    if cfg.tools.enhanced_mr_conversion == "off":
        return None, None
    try:
        from dicomnode.convert.worker import ConversionWorker
    except ImportError:
        logger.warning("Enhanced MR conversion is not available in this build; storing unconverted")
        return None, None
    rc = cfg.receiver
    worker = ConversionWorker(cfg.tools, rc.folder_layout, rc.destination_dir)
    worker.start()
    if resume:
        roots = {rc.destination_dir / "incoming", *(p for _, p in rc.ae_mappings)}
        worker.resume(sorted(roots))
    return worker, worker.submit


def one_malloc_arena() -> None:
    """Ask glibc for one malloc arena in this process (Linux; before its threads start).

    By default glibc gives threads their own arenas (up to 8 per CPU), each
    keeping freed memory for itself; a worker's association, temp-file and
    log threads allocate little, so one shared arena costs no measurable speed
    and keeps a few MB per process off the receiver's resident size.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _worker_main(
    cfg: NodeConfig,
    index: int,
    sock: socket.socket,
    log_pipe: Any,
    conn: Any,
    load: Any,
    negotiating: Any,
) -> None:
    """Entry point of one receiver process.

    Runs until the parent sends ``("stop", grace_s)`` on ``conn`` (running associations
    then get ``grace_s`` to finish), closes it (parent died),
    or SIGTERM arrives. Signals readiness by sending ``"ready"``.
    """
    _die_with_parent()
    one_malloc_arena()
    keep_codecs_out()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent coordinates Ctrl+C
    local_stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: local_stop.set())
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    # Caller, thread and process details are not in the log format: skip collecting
    # them for every record (the logging HOWTO's "Optimization" settings).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    log_handler = _PipeLogHandler(log_pipe)
    root.addHandler(log_handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("dicomnode").setLevel(logging.DEBUG if cfg.logging.verbose else logging.INFO)
    logging.getLogger("pynetdicom").setLevel(
        getattr(logging, cfg.logging.pynetdicom_level, logging.WARNING)
    )

    from dicomnode import tls
    from dicomnode.receiver.admission import SharedLoad
    from dicomnode.receiver.server import Receiver
    from dicomnode.storage import worker_temp_prefix

    # Every (re)started worker resumes: jobs of live workers are skipped by the converter.
    converter, post_store = start_converter(cfg, resume=True)
    receiver = Receiver(
        cfg.receiver,
        post_store,
        tls.server_context(cfg.tls),
        listen_socket=sock,
        shared_load=SharedLoad(load, index, negotiating),
        temp_prefix=worker_temp_prefix(index),
    )
    receiver.start(prepare=False)
    conn.send("ready")
    grace_s = 5.0
    try:
        while not local_stop.is_set():
            receiver.publish_load()  # keeps max_associations node-wide and self-healing
            if conn.poll(0.5):
                message = conn.recv()
                if isinstance(message, tuple) and message[:1] == ("stop",):
                    grace_s = float(message[1])
                    break
    except (EOFError, OSError):
        pass  # the parent is gone: stop serving
    finally:
        receiver.stop(grace_s)
        if converter is not None:
            converter.stop()
        log_handler.close()


class _PipeLogHandler(logging.Handler):
    """Send a worker's records, messages already formatted, to the parent over a pipe.

    Records are sent in batches: at once for WARNING and above (after the
    INFO lines before them), otherwise every :data:`_LOG_BATCH_S` or every
    :data:`_LOG_BATCH_RECORDS` records. One pipe write and one wake-up of the
    parent per record cost a busy receiver more CPU than filing the object
    (bench/README.md). At most
    :data:`_LOG_BATCH_S` of INFO lines is lost if the worker is killed. After
    :meth:`close` every record is sent at once (nothing waits for a batch that
    would never be sent). The batching thread's stop flag must not be named
    ``_closed``: :class:`logging.Handler` uses that name for its own bool.
    """

    _FIELDS = ("name", "levelno", "levelname", "created", "msecs")

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self.conn = conn
        self.setFormatter(logging.Formatter("%(message)s"))
        self._pending: list[dict[str, Any]] = []
        self._batching_stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="LogBatches", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        """Queue ``record`` (message and traceback formatted here); send now if urgent."""
        try:
            fields = {k: getattr(record, k) for k in self._FIELDS}
            fields["msg"] = self.format(record)
            event = getattr(record, "ledger", None)  # a ledger event rides along (dicomnode.ledger)
            if event is not None:
                fields["ledger"] = event
            self._pending.append(fields)
            if (
                record.levelno >= logging.WARNING
                or len(self._pending) >= _LOG_BATCH_RECORDS
                or self._batching_stopped.is_set()
            ):
                self._send()
        except Exception:
            self.handleError(record)

    def _send(self) -> None:
        """Send what is pending (the caller holds the handler lock)."""
        if self._pending:
            batch, self._pending = self._pending, []
            self.conn.send(batch)

    def _run(self) -> None:
        while not self._batching_stopped.wait(_LOG_BATCH_S):
            self.flush()

    def flush(self) -> None:
        """Send pending records now."""
        with contextlib.suppress(Exception):
            self.acquire()
            try:
                self._send()
            finally:
                self.release()

    def close(self) -> None:
        """Send what is pending and stop the batching thread (may be called again, e.g. at exit)."""
        self._batching_stopped.set()
        self.flush()
        super().close()


def _pump_logs(log_pipe: Any) -> None:
    """Hand records from one worker's pipe to this process's handlers until it closes."""
    while True:
        try:
            batch = log_pipe.recv()
        except (EOFError, OSError):
            return
        for fields in batch:
            record = logging.makeLogRecord(fields)
            logging.getLogger(record.name).handle(record)


def _worker_config(cfg: NodeConfig, processes: int) -> NodeConfig:
    """Return ``cfg`` with the node-wide pending-connection bounds shared among ``processes``."""
    rc = cfg.receiver
    share = max(1, processes)
    pending = max(1, -(-rc.max_pending_associations // share))
    per_peer = max(1, -(-rc.max_pending_per_peer // share))
    return replace(
        cfg,
        receiver=replace(rc, max_pending_associations=pending, max_pending_per_peer=per_peer),
    )


@dataclass(slots=True)
class _Worker:
    process: SpawnProcess
    conn: Any
    log_pipe: Any
    pump: threading.Thread


class ReceiverPool:
    """Receiver worker processes sharing one listening socket.

    Each worker has its own control pipe and log queue, so a worker killed at
    any moment cannot block the others or the parent.

    Parameters
    ----------
    cfg : NodeConfig
        The node configuration (pickled to each worker).
    processes : int
        Number of worker processes (at least 2; use :class:`Receiver` for one).
    """

    def __init__(self, cfg: NodeConfig, processes: int) -> None:
        self.cfg = cfg
        self.processes = processes
        self._ctx = multiprocessing.get_context("spawn")
        self._sock: socket.socket | None = None
        self._workers: dict[int, _Worker] = {}
        self._stopping = False
        # Connections served per worker, summed at admission (node-wide max_associations).
        self._load: Any = self._ctx.Array("i", processes)
        # Connections negotiating per worker (sharing out new connections only; under
        # _load's lock).
        self._negotiating: Any = self._ctx.Array("i", processes, lock=False)

    def start(self, timeout_s: float = 60.0) -> None:
        """Bind, spawn the workers and wait until each one serves.

        Raises
        ------
        OSError
            When the address cannot be bound.
        DicomNodeError
            When a worker fails to start.
        """
        from dicomnode.receiver.journal import journal_path, recover_journals
        from dicomnode.receiver.startup import orphan_pending, sweep_stale_parts
        from dicomnode.storage import (
            INCOMING_TMP,
            check_writable,
            clean_stale_temp,
            worker_temp_prefix,
        )

        one_malloc_arena()  # the parent's log pumps share one arena too
        rc = self.cfg.receiver
        check_writable(rc.destination_dir)
        check_writable(rc.errors_dir)
        clean_stale_temp(rc.destination_dir / INCOMING_TMP)
        # Acknowledged objects a stopped node had only in its journals are placed first.
        recover_journals(
            rc.destination_dir,
            [journal_path(Path(), worker_temp_prefix(i)).name for i in range(self.processes)]
            if rc.journal_mb
            else [],
        )
        sweep_stale_parts(rc)
        orphan_pending(rc.destination_dir)
        self._sock = bind_listening_socket(self.cfg.receiver)
        for index in range(self.processes):
            self._spawn(index)
        deadline = time.monotonic() + timeout_s
        for index, worker in self._workers.items():
            if not self._wait_ready(worker, deadline):
                self.stop()
                raise DicomNodeError(f"receiver process {index} did not start")
        rc = self.cfg.receiver
        logger.info(
            "LISTENING ae_title=%s address=%s:%d processes=%d tls=%s",
            rc.ae_title,
            rc.server_ip,
            rc.receive_port,
            self.processes,
            "on" if self.cfg.tls.enabled else "off",
        )

    @staticmethod
    def _wait_ready(worker: _Worker, deadline: float) -> bool:
        while time.monotonic() < deadline:
            try:
                if worker.conn.poll(0.2):
                    return bool(worker.conn.recv() == "ready")
            except (EOFError, OSError):
                return False
            if worker.process.exitcode is not None:
                return False
        return False

    def _spawn(self, index: int) -> None:
        from dicomnode.storage import INCOMING_TMP, clean_stale_temp, worker_temp_prefix

        # A (re)started process begins without temp files: what a crashed
        # predecessor left was never acknowledged.
        clean_stale_temp(
            self.cfg.receiver.destination_dir / INCOMING_TMP, worker_temp_prefix(index)
        )
        # ... and its pending storage commitment reports go to whichever process claims them.
        from dicomnode.receiver.startup import orphan_pending

        orphan_pending(self.cfg.receiver.destination_dir, worker_temp_prefix(index))
        parent_conn, child_conn = self._ctx.Pipe()
        log_recv, log_send = self._ctx.Pipe(duplex=False)
        pump = threading.Thread(
            target=_pump_logs, args=(log_recv,), name=f"log-pump-{index}", daemon=True
        )
        pump.start()
        self._load[index] = 0  # a restarted worker starts with no connections
        self._negotiating[index] = 0
        proc = self._ctx.Process(
            target=_worker_main,
            args=(
                _worker_config(self.cfg, self.processes),
                index,
                self._sock,
                log_send,
                child_conn,
                self._load,
                self._negotiating,
            ),
            name=f"dicomnode-receiver-{index}",
            daemon=False,
        )
        proc.start()
        child_conn.close()
        log_send.close()  # the pump sees end-of-file once the worker is gone
        self._workers[index] = _Worker(proc, parent_conn, log_recv, pump)

    def is_serving(self) -> bool:
        """Return True while the socket is bound and at least one worker runs."""
        return self._sock is not None and any(
            w.process.exitcode is None for w in self._workers.values()
        )

    def active_associations(self) -> int:
        """Return the connections served by all workers (as they last published them)."""
        with self._load.get_lock():
            return int(sum(self._load))

    def supervise(self) -> None:
        """Restart workers that died unexpectedly (call periodically)."""
        if self._stopping:
            return
        for index, worker in list(self._workers.items()):
            if worker.process.exitcode is not None:
                logger.error(
                    "RESTARTING receiver process %d (exit code %s); the others kept serving",
                    index,
                    worker.process.exitcode,
                )
                self._retire(worker)
                self._spawn(index)

    @staticmethod
    def _retire(worker: _Worker) -> None:
        with contextlib.suppress(Exception):
            worker.conn.close()
        # Ends at end-of-file (the worker has exited) once the worker's last lines are handled.
        worker.pump.join(_PUMP_DRAIN_S)
        with contextlib.suppress(Exception):
            worker.log_pipe.close()

    def stop(self, grace_s: float = 5.0) -> None:
        """Ask the workers to stop, wait ``grace_s`` (+2 s), then kill stragglers."""
        self._stopping = True
        for worker in self._workers.values():
            with contextlib.suppress(Exception):
                worker.conn.send(("stop", grace_s))
        deadline = time.monotonic() + grace_s + 2.0
        for worker in self._workers.values():
            proc = worker.process
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.exitcode is None:
                logger.warning("KILLED receiver process %s after the grace period", proc.name)
                proc.kill()
                proc.join(2.0)
            self._retire(worker)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        logger.info("STOPPED receiver processes")

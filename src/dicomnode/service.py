"""Node lifecycle: start receiver, conversion and forwarder together; signals; graceful stop.

Order: folders → conversion worker (resumes interrupted jobs) → receiver →
forwarder. Stop in reverse: stop accepting, finish or abort in-flight work
within a grace period, join. The first SIGINT/SIGTERM/SIGBREAK asks for a
clean stop; a second one forces the process to exit.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from dicomnode import tls
from dicomnode.codecs import keep_codecs_out
from dicomnode.config import NodeConfig
from dicomnode.storage import check_writable

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What to run: the CLI's ``--no-receiver`` / ``--no-watcher``."""

    receiver: bool = True
    forwarder: bool = True


def is_loopback(address: str) -> bool:
    """Return True when ``address`` is a loopback IP or ``localhost``."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def forwarder_state(config: NodeConfig, options: RunOptions) -> tuple[bool, str]:
    """Return (will run, one-line description) for the forwarder."""
    fw = config.forwarder
    if not options.forwarder:
        return False, "disabled (--no-watcher)"
    if not fw.forwards:
        return False, "disabled (no target_aet/target_ip in [FolderWatcher], no [Route:NAME])"
    if not fw.routes:
        return True, f"enabled -> {fw.target_aet}@{fw.target_ip}:{fw.target_port}"
    targets = ", ".join(f"{d.name}={d.address}" for d in fw.routed_destinations())
    return True, f"enabled -> {targets} ({len(fw.routes)} route(s), unrouted: {fw.unrouted})"


def summary_lines(config: NodeConfig, options: RunOptions) -> list[str]:
    """Return the start-up summary (the original README's lines plus what is enabled)."""
    rc = config.receiver
    trusted = ", ".join(rc.trusted_ae_titles)
    if rc.trusts_any_ae:
        if is_loopback(rc.server_ip):
            trusted += f" (any AE title: accepted only because the node listens on loopback {rc.server_ip})"
        else:
            trusted += " (ANY AE title may store: set trusted_ae_titles for a network-facing node)"
    _, fw_text = forwarder_state(config, options)
    lines = [
        f"Configuration loaded from: {config.source}",
        f"AE Title: {rc.ae_title}",
        f"Server IP: {rc.server_ip}",
        f"Receive Port: {rc.receive_port}",
        f"Destination Directory: {rc.destination_dir}",
        f"Watch Folder: {config.forwarder.watch_folder}",
        f"Trusted AE Titles: {trusted}",
    ]
    if rc.ae_mappings:
        lines.append("AE Mappings: " + ", ".join(f"{a} -> {p}" for a, p in rc.ae_mappings))
    lines += [
        f"Receiver: {'enabled' if options.receiver else 'disabled (--no-receiver)'}"
        + (", TLS" if config.tls.enabled and options.receiver else ""),
        f"Forwarder: {fw_text}",
        f"Enhanced MR conversion: {config.tools.enhanced_mr_conversion}",
    ]
    if config.logging.log_file is not None:
        lines.append(f"Log file: {config.logging.log_file}")
    lines.append(f"Ledger: {config.ledger_path}" if config.ledger.enabled else "Ledger: disabled")
    web = config.web
    if web.enabled:
        scheme = "https" if web.https else "http"
        host = f"[{web.address}]" if ":" in web.address else web.address
        lines.append(f"Console: {scheme}://{host}:{web.port}/")
    else:
        lines.append("Console: disabled ([Web] enabled = false)")
    return lines


def set_window_title(title: str) -> None:
    """Set the console window title where supported; never raise."""
    if not title:
        return
    try:
        if sys.platform == "win32":
            import ctypes

            ctypes.windll.kernel32.SetConsoleTitleW(title)  # type: ignore[attr-defined]
        elif sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb":
            safe = "".join(ch for ch in title if ch.isprintable())
            sys.stdout.write(f"\033]0;{safe}\007")
            sys.stdout.flush()
    except Exception:
        logger.debug("could not set the window title", exc_info=True)


class Node:
    """Receiver, conversion worker, forwarder, ledger and console of one configuration."""

    def __init__(self, config: NodeConfig, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.receiver: Any = None
        self.forwarder: Any = None
        self.converter: Any = None
        self.ledger: Any = None
        self.console: Any = None
        self.audit: Any = None
        self._log_handlers: list[logging.Handler] = []

    def _start_ledger(self, forwarding: bool) -> None:
        """Start the ledger writer and route the events of log records to it."""
        from dicomnode.ledger.handler import LedgerHandler
        from dicomnode.ledger.writer import LedgerWriter
        from dicomnode.storage import INCOMING_TMP

        rc = self.config.receiver
        roots: list[Path] = []
        if self.options.receiver:
            roots += [rc.destination_dir / "incoming", *(p for _, p in rc.ae_mappings)]
        if forwarding:
            roots.append(self.config.forwarder.watch_folder)
        on_written = None
        if self.config.audit.syslog:
            from dicomnode.ledger.atna import AuditSender, parse_target

            tls_cfg = self.config.tls
            context = None
            if tls_cfg.ca_bundle is not None or tls_cfg.certificate is not None:
                context = tls.client_context(replace(tls_cfg, enabled=True))
            self.audit = AuditSender(parse_target(self.config.audit.syslog), rc.ae_title, context)
            self.audit.start()
            on_written = self.audit.submit
        self.ledger = LedgerWriter(
            self.config.ledger_path,
            self.config.ledger.retention_days,
            roots,
            skip_dirs=[rc.errors_dir, rc.destination_dir / INCOMING_TMP],
            on_written=on_written,
        )
        self.ledger.start()
        self._attach(LedgerHandler(self.ledger))

    def _attach(self, handler: logging.Handler) -> None:
        logging.getLogger("dicomnode").addHandler(handler)
        self._log_handlers.append(handler)

    def _make_console(self, forwarding: bool) -> None:
        """Create the console (refusing a non-loopback address without credentials)."""
        from dicomnode.web import Console, NodeProbe
        from dicomnode.web.logbuffer import RecentLines

        recent = RecentLines()
        probe = NodeProbe(
            receiver_listening=(lambda: bool(self.receiver and self.receiver.is_serving()))
            if self.options.receiver
            else None,
            active_associations=lambda: (
                int(self.receiver.active_associations()) if self.receiver is not None else 0
            ),
            forwarder_status=(
                lambda: (
                    self.forwarder.status()
                    if self.forwarder is not None
                    else {"running": False, "sending": [], "retry": {}, "last_success": None}
                )
            )
            if forwarding
            else None,
            counters=lambda: self.ledger.counters() if self.ledger is not None else {},
            ledger_available=lambda: bool(self.ledger is not None and self.ledger.available),
        )
        self.console = Console(self.config, probe, recent)
        self._attach(recent)

    def start(self) -> None:
        """Start every enabled component.

        Raises
        ------
        DicomNodeError
            A folder is not writable, or TLS material cannot be loaded.
        OSError
            The listening address cannot be bound.
        """
        cfg = self.config
        if self.options.forwarder:
            check_writable(cfg.forwarder.watch_folder)
        fw_on, _ = forwarder_state(cfg, self.options)
        if not fw_on:
            keep_codecs_out()  # only the forwarder decodes pixels (~35 MB less in this process)
        if cfg.web.enabled:
            self._make_console(fw_on)  # first: a console that may not start stops the node here
        if cfg.ledger.enabled:
            self._start_ledger(fw_on)
        if self.options.receiver:
            from dicomnode.receiver.pool import ReceiverPool, effective_processes, start_converter

            processes = effective_processes(cfg.receiver)
            if processes > 1:
                self.receiver = ReceiverPool(cfg, processes)
            else:
                from dicomnode.receiver.server import Receiver

                self.converter, post_store = start_converter(cfg, resume=True)
                self.receiver = Receiver(cfg.receiver, post_store, tls.server_context(cfg.tls))
            self.receiver.start()
        if fw_on:
            from dicomnode.forwarder import Forwarder
            from dicomnode.ledger.queries import DeliveryLookup

            self.forwarder = Forwarder(
                cfg.forwarder,
                contexts={
                    d.name: tls.client_context(replace(cfg.tls, enabled=True)) if d.tls else None
                    for d in cfg.forwarder.all_destinations()
                },
                delivered=DeliveryLookup(cfg.ledger_path) if cfg.ledger.enabled else None,
            )
            self.forwarder.start()
        if self.console is not None:
            self.console.start()

    def supervise(self) -> None:
        """Restart crashed receiver processes (called from the main loop)."""
        supervise = getattr(self.receiver, "supervise", None)
        if supervise is not None:
            supervise()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting work, finish or abort in-flight work within ``grace_s``, join."""
        if self.console is not None:
            self.console.stop()
        if self.receiver is not None:
            self.receiver.stop(grace_s)
        if self.forwarder is not None:
            self.forwarder.stop(grace_s)
        if self.converter is not None:
            self.converter.stop(grace_s)
        for handler in self._log_handlers:
            logging.getLogger("dicomnode").removeHandler(handler)
        self._log_handlers.clear()
        if self.ledger is not None:
            self.ledger.stop()
        if self.audit is not None:
            self.audit.stop()


class SignalCatcher:
    """Turn SIGINT/SIGTERM/SIGBREAK into a stop request; a second signal forces exit.

    Use as a context manager; the previous handlers are restored on exit.
    """

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set():
            logger.error("second signal %d: forcing exit", signum)
            os._exit(1)
        self.received = signum
        logger.info("SHUTDOWN requested by signal %d (send it again to force)", signum)
        self.stop.set()

    def __enter__(self) -> SignalCatcher:
        names = ["SIGINT", "SIGTERM", "SIGBREAK", "SIGHUP"]
        for name in names:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not in the main thread, or unsupported
                continue
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                continue


def run(config: NodeConfig, options: RunOptions, stop: threading.Event | None = None) -> None:
    """Run the node until ``stop`` is set or a signal arrives, then stop it cleanly.

    Raises
    ------
    DicomNodeError, OSError
        When start-up fails (the CLI turns these into one-line errors).
    """
    stop = stop or threading.Event()
    node = Node(config, options)
    with SignalCatcher(stop):
        try:
            node.start()
            logger.info("READY")
            while not stop.wait(0.5):
                node.supervise()
        finally:
            node.stop(config.stop_grace_s)
    logger.info("STOPPED")

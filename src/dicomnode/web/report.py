"""``dicomnode status``: the dashboard's summary on a terminal, and whether the node is healthy.

With ``[Web] enabled`` the running node's own ``/healthz`` decides health (and a
node that does not answer is not healthy); otherwise the disk guard is checked
here. Counts come from the ledger. Returns the lines and the verdict; printing
is the CLI's job.
"""

from __future__ import annotations

import os
import ssl
import time
import urllib.error
import urllib.request

from dicomnode.config import NodeConfig
from dicomnode.forwarder.batching import FAILED_DIR_NAME
from dicomnode.forwarder.outcome import ERROR_LOG_NAME
from dicomnode.ledger import queries
from dicomnode.ledger.schema import LedgerUnavailable, open_reader
from dicomnode.web.console import disk_free


def _healthz(cfg: NodeConfig) -> tuple[bool, str]:
    web = cfg.web
    host = "127.0.0.1" if web.address in ("0.0.0.0", "") else web.address
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    url = f"{'https' if web.https else 'http'}://{host}:{web.port}/healthz"
    context = None
    if web.https:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # our own node on this host; only health is read
    try:
        with urllib.request.urlopen(url, timeout=5.0, context=context) as resp:
            return True, resp.read().decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode("utf-8", "replace").strip()
    except OSError as exc:
        return False, f"the node does not answer at {url}: {getattr(exc, 'reason', exc)}"


def status_report(cfg: NodeConfig) -> tuple[bool, list[str]]:
    """Return (healthy, lines to print)."""
    lines: list[str] = []
    healthy = True
    if cfg.web.enabled:
        ok, text = _healthz(cfg)
        healthy = ok
        lines.append(f"Health: {'healthy' if ok else 'NOT HEALTHY'} ({text})")
    else:
        lines.append("Health: node not asked ([Web] enabled = false); disk checked here")
    guard = cfg.receiver.min_free_space_mb * 1_000_000
    for path, free in disk_free([cfg.receiver.destination_dir, cfg.forwarder.watch_folder]).items():
        low = guard and free < guard
        healthy = healthy and not low
        lines.append(f"Disk free: {path}: {free / 1e9:.1f} GB{' BELOW GUARD' if low else ''}")
    failed = cfg.forwarder.watch_folder / FAILED_DIR_NAME
    parked = 0
    if failed.is_dir():
        for dirpath, _, files in os.walk(failed):
            parked += sum(
                1
                for f in files
                if not f.startswith(".") and not (dirpath == str(failed) and f == ERROR_LOG_NAME)
            )
    lines.append(f"Parked files: {parked} (in {failed})")
    try:
        conn = open_reader(cfg.ledger_path)
    except LedgerUnavailable as exc:
        lines.append(f"Ledger: {exc}")
        return healthy, lines
    try:
        now = time.time()
        midnight = time.mktime((*time.localtime(now)[:3], 0, 0, 0, 0, 0, -1))
        for title, since in (("Today", midnight), ("Last 7 days", now - 7 * 86400)):
            s = queries.summary(conn, since)
            lines.append(
                f"{title}: received {s.received_total}, forwarded {s.forwarded_total}, "
                f"failed {s.failed_total}"
            )
            for ae, n in s.received.items():
                lines.append(f"  received from {ae}: {n}")
            for dest, n in s.forwarded.items():
                lines.append(f"  forwarded to {dest}: {n}")
            for what, n in s.failed.items():
                lines.append(f"  {what}: {n}")
    finally:
        conn.close()
    return healthy, lines

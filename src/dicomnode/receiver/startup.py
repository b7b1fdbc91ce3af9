"""Start-up chores of the receiver that the pool's parent runs before its workers start.

Clearing what a killed node left behind: ``.part`` copies in the AE folders
(:func:`sweep_stale_parts`) and storage commitment reports pending for
processes that are gone (:func:`orphan_pending`). Imports only the standard
library, the configuration and :mod:`dicomnode.storage`: no pydicom, so a pool
parent that only supervises its workers does not load it (about 20 MB).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Final

from dicomnode.config import ReceiverConfig
from dicomnode.storage import clean_stale_parts

#: Hidden folder of destination_dir holding the pending storage commitment reports.
PENDING_DIR: Final = ".storage-commitment"
#: Name prefix of pending reports left by a previous run, claimed by any process.
ORPHAN_PREFIX: Final = "orphan-"


def orphan_pending(destination_dir: Path, owner: str | None = None) -> int:
    """Mark pending reports of processes that are gone as orphans, for any process to claim.

    Called once per node start for all of them (``owner`` None), and when a
    pool restarts a crashed process for that process's (``owner``: its prefix).
    """
    folder = destination_dir / PENDING_DIR
    count = 0
    with contextlib.suppress(FileNotFoundError):
        for path in folder.iterdir():
            if owner is not None and not path.name.startswith(f"{owner}~"):
                continue
            if path.suffix == ".json" and not path.name.startswith(ORPHAN_PREFIX):
                key = path.name.split("~", 1)[-1]
                with contextlib.suppress(OSError):
                    os.replace(path, folder / f"{ORPHAN_PREFIX}{key}")
                    count += 1
            elif path.name.endswith(".part"):
                with contextlib.suppress(OSError):
                    path.unlink()
    return count


def sweep_stale_parts(cfg: ReceiverConfig) -> threading.Thread:
    """Remove ``.part`` files a killed node left in its AE folders and errors folder.

    Runs once at start; only files older than the start are removed (see
    :func:`dicomnode.storage.clean_stale_parts`), so copies begun since are
    left alone. AE folders outside ``destination_dir`` (where copies across
    volumes go, typically a drained watch folder) are swept before this
    returns; the destination's own tree, which may be a large archive, in a
    background thread.
    """
    started = time.time()
    mapped = [folder for _, folder in cfg.ae_mappings]
    outside = [f for f in mapped if not f.is_relative_to(cfg.destination_dir)]
    clean_stale_parts(outside, started)
    inside = [cfg.destination_dir / "incoming", cfg.errors_dir]
    inside += [f for f in mapped if f.is_relative_to(cfg.destination_dir)]
    thread = threading.Thread(
        target=clean_stale_parts, args=(inside, started), name="PartSweep", daemon=True
    )
    thread.start()
    return thread

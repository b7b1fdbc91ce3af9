"""One-shot commands of the forwarder: ``dicomnode send PATH...`` and ``dicomnode retry-failed``.

:func:`send_paths` delivers files and folders now, with the same order and
per-file outcome rules as the watcher (:func:`~.delivery.send_group`) but no
quiet wait; :func:`retry_failed` moves parked files back into the watch folder.
Both return an :class:`~dicomnode.status.ExitStatus` value. Log verbs:
``SEND-DONE``, ``RETRY-FAILED``.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from dicomnode.config import ForwarderConfig
from dicomnode.forwarder.batching import TOPLEVEL_GROUP
from dicomnode.forwarder.delivery import make_sender, send_group
from dicomnode.forwarder.job import GroupJob, JobFile
from dicomnode.forwarder.outcome import move_back_failed
from dicomnode.status import ExitStatus

logger = logging.getLogger(__name__)


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
            result = send_group(
                job,
                config,
                sender,
                lambda: False,
                bar.step,
                max_associations=config.max_associations,
            )
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

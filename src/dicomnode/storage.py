"""File-system effects: atomic placement, fsync, quarantine, free-space checks.

Every file the node makes visible appears under its final name by a rename of a
complete, fsynced temporary file in the same folder (or, across volumes, a
fsynced ``.part`` copy in the destination folder). Log verbs: ``STORED``,
``QUARANTINED``. Imports the standard library, pydicom types and
:mod:`dicomnode.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

from dicomnode.errors import StorageError
from dicomnode.logsafe import escape

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

#: Suffix of in-progress files; the forwarder never sends these.
PART_SUFFIX: Final = ".part"
#: Hidden folder below destination_dir where incoming objects are streamed.
INCOMING_TMP: Final = ".incoming-tmp"
#: Hidden folder below an AE folder holding markers of pending Enhanced MR conversions;
#: written by the receiver's conversion worker, honoured by the forwarder.
CONVERT_PENDING_DIR: Final = ".convert-pending"
_IS_WINDOWS: Final = sys.platform == "win32"
#: Names :func:`part_path` gives: ``.<final name>.<8 hex digits>.part``.
_PART_NAME: Final = re.compile(r"\..+\.[0-9a-f]{8}" + re.escape(PART_SUFFIX))


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk (POSIX only; a no-op on Windows)."""
    if _IS_WINDOWS:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(fh: BinaryIO) -> None:
    """Flush Python and OS buffers of an open file to disk."""
    fh.flush()
    os.fsync(fh.fileno())


def part_path(final: Path) -> Path:
    """Return a unique hidden in-progress name beside ``final``."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")


def place_file(src: Path, final: Path) -> None:
    """Move the complete, closed file ``src`` to ``final`` atomically.

    ``src`` must already be fsynced. If ``final`` exists it is replaced in one
    step (a re-sent instance replaces the old file). Across volumes the data is
    copied to a ``.part`` file beside ``final``, fsynced and renamed. The folder
    of ``final`` is fsynced, and so is the parent of every folder created for it,
    so the new name survives a power loss once this returns.

    Raises
    ------
    OSError
        When the folder cannot be created or the file cannot be moved.
    """
    created: list[Path] = []
    for attempt in range(4):
        try:
            os.replace(src, final)  # the folder usually exists: no mkdir call
            break
        except FileNotFoundError:
            # The folder is new, or a forwarder watching this tree removed it as
            # emptied between mkdir and rename: create it (src itself still exists).
            if attempt == 3 or not src.exists():
                raise
            created += make_folders(final.parent)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_across_volumes(src, final)
            break
    fsync_dir(final.parent)
    # New folders are only durable once the folders holding their names are flushed too.
    for folder in dict.fromkeys(c.parent for c in created):
        fsync_dir(folder)


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the folders created, outermost first.

    Raises
    ------
    OSError
        When a folder cannot be created.
    """
    missing: list[Path] = []
    probe = folder
    while not probe.is_dir() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
            created.append(path)
        except FileExistsError:
            if not path.is_dir():
                raise
    return created


def _copy_across_volumes(src: Path, final: Path) -> None:
    """Copy ``src`` to a fsynced ``.part`` beside ``final``, rename it, delete ``src``."""
    tmp = part_path(final)
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 1024 * 1024)
            fsync_file(fout)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        src.unlink()


def write_bytes_atomic(data: bytes, final: Path) -> None:
    """Write ``data`` to ``final`` via a fsynced temporary file and a rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(final)
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fsync_file(fh)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


def write_dataset_atomic(ds: Dataset, final: Path) -> None:
    """Save a pydicom Dataset in DICOM file format to ``final`` atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(final)
    try:
        with tmp.open("wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fsync_file(fh)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


def quarantine(src: Path | None, errors_dir: Path, name_hint: str, reason: str) -> Path | None:
    """Keep what was received in ``errors_dir`` with a ``.log`` note giving the reason.

    Parameters
    ----------
    src : Path or None
        The received (temporary) file, moved into errors_dir; None if nothing was received.
    errors_dir : Path
        The errors folder (``<destination_dir>/errors``).
    name_hint : str
        Safe text to put in the file name (e.g. the SOP Instance UID).
    reason : str
        Why the object could not be stored; written to the note.

    Returns
    -------
    Path or None
        Where the object was kept, or None when it could not be kept (disk full).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}_{name_hint}_{uuid.uuid4().hex[:6]}"
    target: Path | None = None
    try:
        errors_dir.mkdir(parents=True, exist_ok=True)
        if src is not None and src.exists():
            target = errors_dir / f"{base}.dcm"
            place_file(src, target)
        write_bytes_atomic(
            f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}\nreason: {escape(reason)}\n".encode(),
            errors_dir / f"{base}.log",
        )
    except OSError as exc:
        logger.error("QUARANTINE-FAILED %s: %s (reason was: %s)", base, exc, reason)
        return target
    logger.warning("QUARANTINED %s reason=%s", target or errors_dir / f"{base}.log", reason)
    return target


def free_space_mb(path: Path) -> float:
    """Return the free space in MB (10^6 bytes) of the volume holding ``path``.

    The nearest existing parent is measured when ``path`` does not exist yet.
    """
    probe = path
    while True:
        try:
            return shutil.disk_usage(probe).free / 1e6
        except FileNotFoundError:
            if probe.parent == probe:
                raise
            probe = probe.parent


def clean_stale_temp(folder: Path, prefix: str = "") -> int:
    """Delete temporary files left in ``folder`` by an interrupted process.

    Such files were never acknowledged to a sender (the sender resends them),
    so deleting them loses nothing. With ``prefix``, only files whose names
    start with it (one receiver process's, see :func:`worker_temp_prefix`) are
    deleted. Returns the number removed.
    """
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if entry.name.startswith(prefix) and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    if removed:
        logger.info("CLEANED %d unacknowledged partial transfer(s) in %s", removed, folder)
    return removed


def worker_temp_prefix(index: int) -> str:
    """Return the name prefix of the temp files of receiver process ``index``.

    Each process of a pool names its temp files with its own prefix, so the
    files of a process that died can be removed when it is restarted while the
    others keep writing theirs.
    """
    return f"w{index}-"


def clean_stale_parts(roots: list[Path], older_than: float) -> int:
    """Delete ``.part`` files (:func:`part_path` names) older than ``older_than`` below ``roots``.

    A process killed while copying an object to a folder on another volume
    (or writing a note or a converted object) leaves such a hidden file beside
    the final name; nothing was acknowledged for it. Only files whose last
    change is before ``older_than`` (epoch seconds: when this node started)
    are removed, so copies in progress are left alone. Hidden folders are not
    entered. Returns the number removed.

    Parameters
    ----------
    roots : list of Path
        AE folders and the errors folder.
    older_than : float
        Epoch seconds; newer files are kept.
    """
    removed = 0
    for root in dict.fromkeys(roots):
        if not root.is_dir():
            continue
        for folder, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not _PART_NAME.fullmatch(name):
                    continue
                path = os.path.join(folder, name)
                try:
                    if os.lstat(path).st_mtime < older_than:
                        os.unlink(path)
                        removed += 1
                except OSError:
                    continue
    if removed:
        logger.info(
            "CLEANED %d stale partial copies (%s files) below %s",
            removed,
            PART_SUFFIX,
            ", ".join(str(r) for r in roots),
        )
    return removed


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove it is writable.

    Raises
    ------
    StorageError
        When it cannot be created or written.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StorageError(f"{folder}: folder is not writable: {exc.strerror or exc}") from None

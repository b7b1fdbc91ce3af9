"""File-system effects: atomic placement, fsync, quarantine, free-space checks.

Every file the node makes visible appears under its final name by a rename of a
complete, fsynced temporary file in the same folder (or, across volumes, a
fsynced ``.part`` copy in the destination folder). Log verbs: ``STORED``,
``QUARANTINED``. Imports the standard library, pydicom types and
:mod:`dicomnode.errors`.

Length: a little over 500 lines, on purpose: it is the one home of
durability (rename, fsync, folder creation and lookup by identity under the
folder lock, stale-temp cleanup); every write the node makes visible goes
through it, so its rules are read in one place.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Protocol

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
#: Hidden folder below an AE folder where converted series are built before their rename.
CONVERT_STAGING_DIR: Final = ".convert-tmp"
#: Windows only: the lock file (in the lock folder's ``.incoming-tmp``) held while a
#: patient/study/series folder is created. POSIX locks the folder itself: no file at all.
FOLDERS_LOCK: Final = ".folders.lock"
_IS_WINDOWS: Final = sys.platform == "win32"
#: Names :func:`part_path` gives: ``.<final name>.<8 hex digits>.part``.
_PART_NAME: Final = re.compile(r"\..+\.[0-9a-f]{8}" + re.escape(PART_SUFFIX))

if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _open_lock(folder: Path) -> int:
        (folder / INCOMING_TMP).mkdir(parents=True, exist_ok=True)
        path = folder / INCOMING_TMP / FOLDERS_LOCK
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0))

    def _lock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                return
            except OSError:  # LK_LOCK gives up after ~10 s: keep waiting
                continue

    def _unlock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _open_lock(folder: Path) -> int:
        return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))

    def _lock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


#: What ``fsync`` of a folder answers where the file system cannot flush folders
#: (some network and FUSE file systems): nothing to wait for, not a failure.
_FOLDER_FLUSH_UNSUPPORTED: Final = frozenset(
    {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}
)


def flush_folder(path: Path) -> None:
    """Flush a folder's entries to disk (POSIX only; a no-op on Windows).

    A folder that cannot be opened (removed meanwhile, unreadable) or whose
    file system cannot flush folders is skipped: there is nothing to wait for.

    Raises
    ------
    OSError
        When the flush itself fails (an I/O error, a full disk): the names in
        the folder may not survive a power loss, so nothing placed there may be
        reported as stored.
    """
    if _IS_WINDOWS:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FOLDER_FLUSH_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk as :func:`flush_folder` does, never raising (best effort)."""
    with contextlib.suppress(OSError):
        flush_folder(path)


def fsync_path(path: Path) -> None:
    """Flush the file at ``path`` to disk.

    Raises
    ------
    OSError
        When it cannot be opened or flushed.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(fh: BinaryIO) -> None:
    """Flush Python and OS buffers of an open file to disk."""
    fh.flush()
    os.fsync(fh.fileno())


def _libc() -> Any:
    """Return the C library through ctypes on Linux, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC: Final = _libc()


def _syncfs_reports_errors() -> bool:
    """Return True on Linux 5.8 or later, where ``syncfs`` reports write errors of the files it flushes."""
    if _LIBC is None:
        return False
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


#: Whether a batch of files may be flushed by one ``syncfs`` (else one fsync each).
_SYNCFS_BATCHES: Final = _syncfs_reports_errors()
#: ``SYNC_FILE_RANGE_WRITE``: start writing the range's dirty pages, do not wait.
_SYNC_FILE_RANGE_WRITE: Final = 2


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting (Linux only).

    Durability still comes only from a later fsync; this just lets the disk work
    while the caller receives the rest of the object. ``nbytes`` 0 means to the
    end of the file. Errors are ignored: the fsync that follows reports them.
    """
    if _LIBC is not None:
        import ctypes

        _LIBC.sync_file_range(
            fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes), _SYNC_FILE_RANGE_WRITE
        )


def syncfs(fd: int) -> bool:
    """Flush the whole file system holding ``fd`` (Linux ``syncfs``); False where not used.

    Not used (False) before Linux 5.8, whose ``syncfs`` did not report write
    errors: a file's failed write would then go unnoticed.

    Raises
    ------
    OSError
        When the file system reports a write error.
    """
    if _LIBC is None or not _SYNCFS_BATCHES:
        return False
    if _LIBC.syncfs(fd) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return True


class _SyncRequest:
    """One caller's wish to have ``item`` flushed, and what came of it."""

    __slots__ = ("done", "error", "item")

    def __init__(self, item: object) -> None:
        self.item = item
        self.done = False
        self.error: OSError | None = None


class GroupSync:
    """Group commit of flushes: requests that arrive while a flush runs share the next one.

    A caller asks :meth:`sync` for one item (a file descriptor or a folder)
    and gets control back only once that item is on disk. When no flush is
    running it flushes its own request at once (no thread switch: a lone
    association pays nothing for the grouping). When a flush is running it
    waits; when that flush ends, one of the waiters becomes the leader and
    flushes *every* request queued meanwhile in one batch, then wakes the rest.
    So several associations finishing objects at the same moment do not each
    wait for their own disk flush behind each other's: they wait for at most
    one flush in progress plus the one batch that contains their own.

    Parameters
    ----------
    flush_batch : callable
        Given the queued items (in arrival order), flushes them and returns one
        ``OSError`` or None per item. It may raise (then every item of the batch
        gets that error, when it is an ``OSError``).
    """

    def __init__(self, flush_batch: Callable[[list[Any]], list[OSError | None]]) -> None:
        self._flush_batch = flush_batch
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_SyncRequest] = []
        self._busy = False
        #: Largest batch flushed so far (for measurements and tests).
        self.largest_batch = 0

    def sync(self, item: object) -> None:
        """Return once ``item`` is flushed (by this caller or in a batch led by another).

        Raises
        ------
        OSError
            When flushing ``item`` failed.
        """
        cond = self._cond
        with cond:
            if not self._busy:  # nothing in flight: flush at once, with whatever is queued
                self._busy = True
                batch, self._queue = self._queue, []
                request = _SyncRequest(item)
                batch.append(request)
            else:
                request = _SyncRequest(item)
                self._queue.append(request)
                while self._busy and not request.done:
                    cond.wait()
                if request.done:
                    if request.error is not None:
                        raise request.error
                    return
                batch, self._queue = self._queue, []
                self._busy = True
        errors: list[OSError | None] = [None] * len(batch)
        try:
            errors = self._flush_batch([r.item for r in batch])
        except OSError as exc:
            errors = [exc] * len(batch)
        finally:
            with cond:
                for queued, error in zip(batch, errors, strict=False):
                    queued.error = error
                    queued.done = True
                if len(batch) > self.largest_batch:
                    self.largest_batch = len(batch)
                self._busy = False
                if len(batch) > 1 or self._queue:  # someone waits: for this batch or to lead
                    cond.notify_all()
        if request.error is not None:
            raise request.error


def fsync_paths(paths: list[Any]) -> list[OSError | None]:
    """Flush the files at ``paths`` to disk; return each one's error or None (a :class:`GroupSync` batch).

    One file is fsynced. Several files (all on one file system: the receiver's
    temp folder) are flushed by one ``syncfs`` on Linux: every fsync ends in its
    own disk cache flush, so k files would cost k flushes, one ``syncfs`` costs
    one (plus whatever else is dirty on that file system). Elsewhere, or when
    ``syncfs`` is unavailable, each file is fsynced.
    """
    if len(paths) > 1:
        try:
            fd = os.open(paths[0], os.O_RDONLY)
            try:
                if syncfs(fd):
                    return [None] * len(paths)
            finally:
                os.close(fd)
        except OSError as exc:
            return [exc] * len(paths)
    errors: list[OSError | None] = []
    for path in paths:
        try:
            fsync_path(path)
            errors.append(None)
        except OSError as exc:
            errors.append(exc)
    return errors


def fsync_dirs(folders: list[Any]) -> list[OSError | None]:
    """Flush each distinct folder of ``folders`` once; return each one's error or None (a :class:`GroupSync` batch).

    As :func:`flush_folder`: a folder that cannot be opened, or whose file
    system cannot flush folders, is no error; a failed flush is.
    """
    outcome: dict[Any, OSError | None] = {}
    for folder in dict.fromkeys(folders):
        try:
            flush_folder(folder)
            outcome[folder] = None
        except OSError as exc:
            outcome[folder] = exc
    return [outcome[folder] for folder in folders]


def part_path(final: Path) -> Path:
    """Return a unique hidden in-progress name beside ``final``."""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")


def place_file(
    src: Path,
    final: Path,
    create_folders: bool = True,
    sync_dir: Callable[[Path], None] | None = None,
) -> None:
    """Move the complete, closed file ``src`` to ``final`` atomically.

    ``src`` must already be fsynced. If ``final`` exists it is replaced in one
    step (a re-sent instance replaces the old file). Across volumes the data is
    copied to a ``.part`` file beside ``final``, fsynced and renamed. The folder
    of ``final`` is fsynced, and so is the parent of every folder created for it,
    so the new name survives a power loss once this returns.

    With ``create_folders=False`` a missing folder raises FileNotFoundError
    (the caller resolves folders itself, see :class:`FolderResolver`).
    ``sync_dir`` flushes the folder of ``final`` (default :func:`flush_folder`;
    the receiver passes a :class:`GroupSync` so concurrent objects share flushes).

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
            if attempt == 3 or not create_folders or not src.exists():
                raise
            created += make_folders(final.parent)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_across_volumes(src, final)
            break
    (sync_dir or flush_folder)(final.parent)
    # New folders are only durable once the folders holding their names are flushed too.
    for folder in dict.fromkeys(c.parent for c in created):
        flush_folder(folder)


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


class FolderLevel(Protocol):
    """One level of a folder plan (:class:`dicomnode.organise.FolderLevel`)."""

    @property
    def name(self) -> str:
        """The folder name this object gives the level when it creates it."""

    @property
    def tag(self) -> str | None:
        """The identity tag the folder name ends with (``_<tag>``), or None."""


class FolderResolver:
    """Find or create the folders that stand for an object's patient, study and series.

    A level with an identity tag is the folder of the parent whose name ends
    with ``_<tag>``, whatever the rest of its name says: the first object of an
    identity names the folder, later ones join it, also after a restart. New
    folders are created only while holding an exclusive lock, after looking
    again, so receiver processes and threads that file objects of one study at
    the same moment create one folder. The lock is ``flock`` on the lock folder
    itself (POSIX: no file is created; where the file system refuses it, e.g.
    some network shares, only the threads of this process are excluded and a
    warning is logged once) or, on Windows, a lock file in its ``.incoming-tmp``.
    Folders found are remembered (one entry per series); a caller whose folder
    has vanished (a forwarder removed it once empty) calls :meth:`forget` and
    resolves again.

    Parameters
    ----------
    lock_dir : Path, optional
        The folder whose lock every process of the node shares (the receiver's
        ``destination_dir``: it is never removed); None locks the root given to
        each call.
    """

    def __init__(self, lock_dir: Path | None = None, cache_size: int = 512) -> None:
        self._cache: dict[tuple[Path, tuple[str, ...]], Path] = {}
        self._cache_size = cache_size
        self._thread_lock = threading.Lock()
        self._lock_dir = lock_dir
        self._warned = False

    def resolve(self, root: Path, plan: Sequence[FolderLevel]) -> Path:
        """Return the existing or newly created folder of ``plan`` below ``root``.

        Folders created are fsynced into their parents before this returns.

        Raises
        ------
        FileNotFoundError
            When a folder found on the way was removed meanwhile (a forwarder
            removes emptied folders): call :meth:`forget` and resolve again.
        OSError
            When a folder cannot be created.
        """
        key = (root, tuple(level.tag or "/" + level.name for level in plan))
        found = self._cache.get(key)
        if found is not None:
            return found
        folder = root
        created: list[Path] = [] if root.is_dir() else make_folders(root)
        for level in plan:
            folder = self._level(folder, level, root, created)
        for parent in dict.fromkeys(c.parent for c in created):
            flush_folder(parent)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[key] = folder
        return folder

    def forget(self) -> None:
        """Drop every remembered folder (one of them no longer exists)."""
        self._cache.clear()

    def place_folder(
        self, staged: Path, root: Path, plan: Sequence[FolderLevel]
    ) -> tuple[Path, bool]:
        """Make the complete folder ``staged`` the last level of ``plan``, unless it exists.

        Returns
        -------
        tuple
            ``(folder, True)`` when ``staged`` was renamed into place (a new folder,
            fsynced into its parent); ``(existing folder, False)`` when the level
            already exists: the caller moves the files in.

        Raises
        ------
        OSError
            When a folder cannot be created or renamed.
        """
        if not plan:
            return root, False
        try:
            return self._place_folder(staged, root, plan)
        except FileNotFoundError:
            if not staged.is_dir():
                raise
            self.forget()  # a remembered parent was removed since (emptied by a forwarder)
            return self._place_folder(staged, root, plan)

    def _place_folder(
        self, staged: Path, root: Path, plan: Sequence[FolderLevel]
    ) -> tuple[Path, bool]:
        parent = self.resolve(root, plan[:-1])
        last = plan[-1]
        if last.tag is not None:
            existing = find_tagged(parent, last.tag)
            if existing is not None:
                return existing, False
        with self._locked(root):
            if last.tag is not None:
                existing = find_tagged(parent, last.tag)
                if existing is not None:
                    return existing, False
            target = parent / last.name
            if target.is_dir():
                return target, False
            os.rename(staged, target)
        flush_folder(parent)
        return target, True

    def _level(self, parent: Path, level: FolderLevel, root: Path, created: list[Path]) -> Path:
        tag = level.tag
        if tag is None:
            target = parent / level.name
            if not target.is_dir():
                created += make_folders(target)
            return target
        existing = find_tagged(parent, tag)
        if existing is not None:
            return existing
        with self._locked(root):
            existing = find_tagged(parent, tag)
            if existing is not None:
                return existing
            target = parent / level.name
            # The parent was found a moment ago; if a forwarder has removed it since,
            # it must be found or created again by identity (the caller retries).
            target.mkdir()
            created.append(target)
            return target

    @contextlib.contextmanager
    def _locked(self, root: Path) -> Iterator[None]:
        """Hold the folder lock: against other threads, then other processes."""
        folder = self._lock_dir or root
        with self._thread_lock:
            fd = _open_lock(folder)
            try:
                locked = self._lock(fd, folder)
                try:
                    yield
                finally:
                    if locked:
                        _unlock_fd(fd)
            finally:
                os.close(fd)

    def _lock(self, fd: int, folder: Path) -> bool:
        """Take the inter-process lock; False (warned once) where the file system refuses it."""
        try:
            _lock_fd(fd)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "cannot lock %s (%s): new patient/study/series folders are coordinated "
                    "within this process only",
                    folder,
                    exc.strerror or exc,
                )
            return False
        return True


def find_tagged(parent: Path, tag: str) -> Path | None:
    """Return the folder of ``parent`` whose name ends with ``_<tag>`` (the first by name)."""
    suffix = "_" + tag
    matches: list[str] = []
    try:
        with os.scandir(parent) as entries:
            for entry in entries:
                if entry.name.endswith(suffix) and entry.is_dir(follow_symlinks=True):
                    matches.append(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return parent / min(matches) if matches else None


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
    flush_folder(final.parent)


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
    flush_folder(final.parent)


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
            fsync_path(src)  # the receiver hands it over unflushed
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


#: A free-space measurement far above the guard is used again for this long (seconds) ...
_GUARD_REUSE_S: Final = 0.05
#: ... while it exceeds the guard by this much (MB): more than the node writes in that time.
_GUARD_MARGIN_MB: Final = 256.0


class DiskGuard:
    """The ``min_free_space_mb`` check of received objects, without a ``statvfs`` per check.

    A volume measured far above the guard (by :data:`_GUARD_MARGIN_MB`) is
    not measured again for :data:`_GUARD_REUSE_S`: a receiver checks twice per
    object, hundreds of times a second. Near or below the guard every check
    measures, so a refusal starts and ends with the free space itself.

    Parameters
    ----------
    min_free_mb : float
        The guard; 0 turns the check off.
    """

    def __init__(self, min_free_mb: float) -> None:
        self.min_free_mb = min_free_mb
        self._far_above: dict[Path, float] = {}

    def shortfall(self, path: Path) -> float | None:
        """Return the free MB of the volume holding ``path`` when below the guard, else None.

        Raises
        ------
        OSError
            When the free space cannot be measured.
        """
        if not self.min_free_mb:
            return None
        now = time.monotonic()
        if now < self._far_above.get(path, 0.0):
            return None
        free = free_space_mb(path)
        if free >= self.min_free_mb + _GUARD_MARGIN_MB:
            if len(self._far_above) > 64:
                self._far_above.clear()
            self._far_above[path] = now + _GUARD_REUSE_S
        else:
            self._far_above.pop(path, None)
        return free if free < self.min_free_mb else None


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

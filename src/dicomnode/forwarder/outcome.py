"""Apply send outcomes on disk: delete what was acknowledged, park what was refused.

A delivered file is deleted and the folders it leaves empty are removed (never
the watch folder itself). A refused or undeliverable file is moved, by rename,
to ``<watch_folder>/failed/<YYYYmmdd-HHMMSS>_<group>/<path inside the group>``
after one line describing why has been appended (and fsynced) to
``failed/send_errors.log``; a kill between the two steps at worst leaves a log
line for a file that is retried. :func:`move_back_failed` undoes parking for
``dicomnode retry-failed``. Log verbs: ``QUARANTINED`` (file parked in failed/),
``RETRY-QUEUED``.
Imports the standard library and :mod:`dicomnode.storage`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from dicomnode.forwarder.batching import FAILED_DIR_NAME, TOPLEVEL_GROUP, group_label
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.logsafe import escape
from dicomnode.status import describe_status
from dicomnode.storage import fsync_dir

logger = logging.getLogger(__name__)

#: Log of every parked file, inside failed/.
ERROR_LOG_NAME: Final = "send_errors.log"
_PARKED_NAME: Final = re.compile(r"^\d{8}-\d{6}_(.+)$")
_LOG_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class ParkReason:
    """Why a file is parked, as written to ``send_errors.log``.

    Attributes
    ----------
    status : int or None
        The DIMSE status the target returned, None when there was none.
    reason : str
        Human-readable cause (used when there is no status, or in addition to it).
    sop_instance_uid : str
        The object's SOP Instance UID if known.
    """

    status: int | None
    reason: str
    sop_instance_uid: str = ""

    def describe(self) -> str:
        """Return ``status=0xC000 Error: cannot understand`` style text, or ``status=- <reason>``.

        The text is always one line (whitespace runs become one space).
        """
        if self.status is None:
            return _one_line(f"status=- {self.reason}")
        meaning = describe_status(self.status)
        extra = f" ({self.reason})" if self.reason and self.reason != meaning else ""
        return _one_line(f"status=0x{self.status:04X} {meaning}{extra}")


def _one_line(text: str) -> str:
    """Return ``text`` as one line of printable text (whitespace runs become one space).

    Folder and file names, UIDs and reasons come from files the node did not
    write: any control character left is escaped (:func:`dicomnode.logsafe.escape`),
    so a name cannot forge a line or a tab-separated field of ``send_errors.log``.
    """
    return escape(re.sub(r"\s+", " ", text).strip())


def remove_empty_parents(path: Path, stop_at: Path) -> None:
    """Remove ``path``'s parent folders while they are empty, up to but not including ``stop_at``."""
    remove_empty_folders(path.parent, stop_at)


def remove_empty_folders(folder: Path, stop_at: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, up to but not including ``stop_at``.

    Only folders that resolve to a place strictly inside ``stop_at`` are removed.
    """
    stop = stop_at.resolve()
    while True:
        try:
            resolved = folder.resolve()
        except OSError:
            return
        if resolved == stop or stop not in resolved.parents:
            return
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def delete_delivered(path: Path, watch_folder: Path, prune: bool = True) -> bool:
    """Delete an acknowledged file and (with ``prune``) the folders it leaves empty.

    ``prune=False`` leaves the folders to the caller, who removes the emptied
    ones once per group (:func:`remove_empty_folders`) instead of once per file.

    Returns
    -------
    bool
        True when the file is gone (also when it was already gone).
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.error("DELETE-FAILED %s: %s (it may be sent again)", path, exc)
        return False
    if prune:
        remove_empty_parents(path, watch_folder)
    return True


def park_stamp(wall_time: float) -> str:
    """Return the ``YYYYmmdd-HHMMSS`` stamp of a parked folder."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(wall_time))


def parked_folder(watch_folder: Path, group: str, stamp: str, destination: str = "") -> Path:
    """Return ``failed/[<destination>/]<stamp>_<group label>`` for one parking run of ``group``."""
    base = watch_folder / FAILED_DIR_NAME
    if destination:
        base = base / destination_folder(destination)
    return base / f"{stamp}_{group_label(group)}"


def destination_folder(destination: str) -> str:
    """Return the folder name of a destination below failed/ (unsafe characters become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", destination).strip(".") or "_"
    return name


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for n in range(1, 10000):
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(errno.EEXIST, "no free name", str(path))


def append_error_log(watch_folder: Path, line: str) -> None:
    """Append one line to ``failed/send_errors.log`` and fsync it."""
    log_path = watch_folder / FAILED_DIR_NAME / ERROR_LOG_NAME
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with _LOG_LOCK, log_path.open("a", encoding="utf-8", newline="\n") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def park_file(
    src: Path,
    *,
    park_root: Path,
    group: str,
    inside: PurePosixPath,
    display: str,
    stamp: str,
    why: ParkReason,
    wall_time: float,
    prune_root: Path,
    destination: str = "",
    copy: bool = False,
) -> Path | None:
    """Move (or copy) one file into ``failed/[<destination>/]<stamp>_<group>/<inside>`` and log why.

    The line is appended to ``failed/send_errors.log`` (and fsynced) before the
    rename. An existing file in failed/ is never overwritten: a ``.1``, ``.2``...
    suffix is added instead. Folders emptied by the move are removed up to
    ``prune_root``.

    Parameters
    ----------
    src : Path
        The file to park.
    park_root : Path
        The watch folder; ``failed/`` is below it.
    group : str
        Group key (top-level folder name, empty for loose files).
    inside : PurePosixPath
        Path kept below the parked folder (the path inside the group).
    display : str
        The file as named in the log (its path relative to the watch folder).
    stamp : str
        The parking run's time stamp (one per group send attempt).
    why : ParkReason
        Status and reason, written to ``send_errors.log``.
    wall_time : float
        Epoch seconds of the decision, written to the log.
    prune_root : Path
        Highest folder that is never removed.
    destination : str
        The destination that refused it (routed sending): the file goes below
        ``failed/<destination>/`` and the log line names it. Empty for the single target.
    copy : bool
        Copy instead of moving (the file stays for its other destinations); the
        copy gets a new modification time.

    Returns
    -------
    Path or None
        Where the file (or its copy) now is, or None when it could not be parked (it stays).
    """
    folder = parked_folder(park_root, group, stamp, destination)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall_time))
    line = "\t".join(
        [
            when,
            *([f"destination={_one_line(destination)}"] if destination else []),
            f"group={_one_line(group_label(group))}",
            f"file={_one_line(display)}",
            f"sop_instance_uid={_one_line(why.sop_instance_uid or '-')}",
            why.describe(),
        ]
    )
    try:
        if not src.exists():
            raise FileNotFoundError(str(src))
        dest = _unique(folder.joinpath(*inside.parts))
        dest.parent.mkdir(parents=True, exist_ok=True)
        parked = dest.relative_to(park_root).as_posix()
        append_error_log(park_root, f"{line}\tparked={_one_line(parked)}")
        if copy:
            _copy_synced(src, dest)
        else:
            shutil.move(str(src), str(dest))
        fsync_dir(dest.parent)
    except FileNotFoundError:
        logger.warning("PARK-SKIPPED %s: file vanished", display)
        return None
    except OSError as exc:
        logger.error("PARK-FAILED %s: %s (file stays where it is)", display, exc)
        return None
    if not copy:
        remove_empty_parents(src, prune_root)
    logger.warning(
        "QUARANTINED group=%s file=%s sop_instance_uid=%s %s parked=%s%s",
        group_label(group),
        display,
        why.sop_instance_uid or "-",
        why.describe(),
        dest,
        f" destination={destination}" if destination else "",
        extra=ledger_extra(
            EventKind.PARKED,
            sop_uid=why.sop_instance_uid or None,
            path=str(dest),
            destination=destination or None,
            status=f"0x{why.status:04X}" if why.status is not None else None,
            reason=why.describe(),
        ),
    )
    return dest


def _copy_synced(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` (which must not exist) and fsync it."""
    with src.open("rb") as fin, dest.open("xb") as fout:
        try:
            shutil.copyfileobj(fin, fout, 1024 * 1024)
            fout.flush()
            os.fsync(fout.fileno())
        except BaseException:
            fout.close()
            dest.unlink(missing_ok=True)
            raise


@dataclass(frozen=True, slots=True)
class MoveBackReport:
    """Result of :func:`move_back_failed`.

    Attributes
    ----------
    moved : int
        Files moved back into the watch folder.
    kept : int
        Files left in failed/ because their target path already exists or the move failed.
    """

    moved: int
    kept: int


def _parked_folders(failed: Path) -> list[Path]:
    """Return the ``<stamp>_<group>`` folders of failed/, also those below ``<destination>/``."""
    found: list[Path] = []
    for folder in sorted(p for p in failed.iterdir() if p.is_dir()):
        if _PARKED_NAME.match(folder.name):
            found.append(folder)
            continue
        inner = sorted(p for p in folder.iterdir() if p.is_dir() and _PARKED_NAME.match(p.name))
        found += inner if inner else [folder]
    return found


def _group_of_parked(folder: Path) -> str:
    """Return the group key from a ``<YYYYmmdd-HHMMSS>_<group label>`` folder name."""
    match = _PARKED_NAME.match(folder.name)
    label = match.group(1) if match else folder.name
    return TOPLEVEL_GROUP if label == group_label(TOPLEVEL_GROUP) else label


def move_back_failed(watch_folder: Path) -> MoveBackReport:
    """Move every parked file back to where it came from in the watch folder.

    ``failed/<stamp>_<group>/<path>`` returns to ``<watch_folder>/<group>/<path>``
    (loose files to the top level). An existing file is never overwritten: such
    files stay in failed/ and are logged. ``send_errors.log`` is kept. Emptied
    parked folders are removed.
    """
    failed = watch_folder / FAILED_DIR_NAME
    moved = kept = 0
    if not failed.is_dir():
        return MoveBackReport(0, 0)
    for folder in _parked_folders(failed):
        group = _group_of_parked(folder)
        base = watch_folder if group == TOPLEVEL_GROUP else watch_folder / group
        for src in sorted(p for p in folder.rglob("*") if p.is_file()):
            dest = base / src.relative_to(folder)
            if dest.exists() or dest.is_symlink():
                logger.warning("RETRY-KEPT %s: %s already exists", src, dest)
                kept += 1
                continue
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                _move_no_overwrite(src, dest)
            except OSError as exc:
                logger.error("RETRY-KEPT %s: %s", src, exc)
                kept += 1
                continue
            moved += 1
            _log_moved_back(src, dest, "")
        remaining = [p for p in folder.rglob("*") if p.is_file()]
        if not remaining:
            shutil.rmtree(folder, ignore_errors=True)
            if folder.parent != failed:  # an emptied failed/<destination>/
                with contextlib.suppress(OSError):
                    folder.parent.rmdir()
    return MoveBackReport(moved, kept)


def _log_moved_back(src: Path, dest: Path, actor: str) -> None:
    logger.info(
        "RETRY-QUEUED %s -> %s",
        src,
        dest,
        extra=ledger_extra(
            EventKind.MOVED_BACK, path=str(dest), reason=str(src), actor=actor or None
        ),
    )


def move_back_file(watch_folder: Path, parked: Path, actor: str = "") -> Path:
    """Move one parked file back to where it came from (the console's Retry).

    Parameters
    ----------
    watch_folder : Path
        The watch folder; ``parked`` must lie in its ``failed/<stamp>_<group>/``.
    parked : Path
        The parked file.
    actor : str
        Who asked (recorded in the ledger).

    Returns
    -------
    Path
        Where the file is now.

    Raises
    ------
    ValueError
        When ``parked`` is not a parked file.
    FileExistsError
        When a file already exists at its original place (never overwritten).
    OSError
        When the move fails.
    """
    failed = (watch_folder / FAILED_DIR_NAME).resolve()
    resolved = parked.resolve()
    if failed not in resolved.parents or resolved.parent == failed or not resolved.is_file():
        raise ValueError(f"{parked} is not a parked file")
    parts = resolved.relative_to(failed).parts
    folder = failed / parts[0]
    if not _PARKED_NAME.match(parts[0]) and len(parts) > 2 and _PARKED_NAME.match(parts[1]):
        folder = folder / parts[1]  # failed/<destination>/<stamp>_<group>/...
    group = _group_of_parked(folder)
    base = watch_folder if group == TOPLEVEL_GROUP else watch_folder / group
    dest = base / resolved.relative_to(folder)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(errno.EEXIST, "a file is already there", str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    _move_no_overwrite(resolved, dest)
    _log_moved_back(parked, dest, actor)
    remove_empty_parents(resolved, failed)
    return dest


def _move_no_overwrite(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest``, failing if ``dest`` exists (hard link + unlink on POSIX)."""
    try:
        os.link(src, dest)
    except FileExistsError:
        raise
    except OSError:
        # Hard links unsupported (some shares, cross-volume): best effort rename.
        if dest.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(dest)) from None
        shutil.move(str(src), str(dest))
        return
    src.unlink()
    fsync_dir(dest.parent)

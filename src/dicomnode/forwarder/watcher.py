"""See changes in the watch folder: a full or per-group scan, plus watchdog events.

:func:`scan_folder` walks the watch folder (or one group) and returns a
:class:`~dicomnode.forwarder.batching.FileEntry` per visible file, skipping
``failed/``, hidden entries and temporary files without descending into them.
:class:`EventSource` runs a watchdog observer that only reports *which group*
changed; the scanner stays the source of truth (events get lost on network
shares), so with ``use_polling`` no observer is started at all. This is the only
forwarder module that imports watchdog.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from dicomnode.config import COMMITMENT_STORE_NAME
from dicomnode.forwarder.batching import (
    FAILED_DIR_NAME,
    TEMP_SUFFIXES,
    TOPLEVEL_GROUP,
    FileEntry,
    group_key_of,
    should_ignore,
)
from dicomnode.forwarder.state import STATE_DIR_NAME
from dicomnode.logsafe import escape
from dicomnode.storage import (
    CONVERT_PENDING_DIR,
    CONVERT_STAGING_DIR,
    FOLDERS_LOCK,
    INCOMING_TMP,
)

logger = logging.getLogger(__name__)

#: Hidden names of dicomnode's own bookkeeping: skipped without a log line.
_OWN_HIDDEN: Final = frozenset(
    {
        STATE_DIR_NAME,
        COMMITMENT_STORE_NAME,
        CONVERT_PENDING_DIR,
        CONVERT_STAGING_DIR,
        FOLDERS_LOCK,
        INCOMING_TMP,
    }
)
#: dicomnode's own in-progress copies (``storage.part_path``): ``.<name>.<8 hex>.part``.
_OWN_PART: Final = re.compile(r"\..+\.[0-9a-f]{8}\.part")


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file or folder in the watch folder that the forwarder will never send.

    Attributes
    ----------
    rel_path : PurePosixPath
        Path relative to the watch folder.
    reason : str
        Why it is not sent.
    """

    rel_path: PurePosixPath
    reason: str


def skip_reason(rel_path: PurePosixPath, is_dir: bool) -> str | None:
    """Return why the forwarder skips this entry and must say so, or None.

    None for entries that are sent (or descended into), for the parking folder
    ``failed/`` (its files were reported when parked) and for dicomnode's own
    hidden bookkeeping (state, conversion markers, folder lock, in-progress copies).
    """
    name = rel_path.name
    if len(rel_path.parts) == 1 and name == FAILED_DIR_NAME:
        return None if is_dir else f"a top-level entry named {FAILED_DIR_NAME!r} is never sent"
    if name.startswith("."):
        if name in _OWN_HIDDEN or _OWN_PART.fullmatch(name):
            return None
        what = "hidden folder (nothing inside is sent)" if is_dir else "hidden file name"
        return f"{what}: names starting with '.' are never sent"
    if not is_dir and name.lower().endswith(TEMP_SUFFIXES):
        return "temporary file name (*.part, *.tmp): never sent"
    return None


def _walk(
    root: Path, rel: PurePosixPath, skipped: list[Skipped] | None = None
) -> Iterator[FileEntry]:
    try:
        with os.scandir(root.joinpath(*rel.parts)) as it:
            entries = list(it)
    except OSError:
        return
    for entry in entries:
        child = rel / entry.name
        try:
            if entry.is_dir(follow_symlinks=False):
                if not _skip_dir(child):
                    yield from _walk(root, child, skipped)
                elif skipped is not None and (reason := skip_reason(child, True)):
                    skipped.append(Skipped(child, reason))
            elif not should_ignore(child) and entry.is_file(follow_symlinks=True):
                st = entry.stat(follow_symlinks=True)
                yield FileEntry(child, st.st_size, st.st_mtime_ns)
            elif skipped is not None and (reason := skip_reason(child, False)):
                skipped.append(Skipped(child, reason))
        except OSError:
            continue


def _skip_dir(rel: PurePosixPath) -> bool:
    """Return True for folders never descended into: failed/ and hidden folders."""
    parts = rel.parts
    return parts[0] == "failed" or any(p.startswith(".") for p in parts)


def scan_folder(
    watch_folder: Path, group: str | None = None, skipped: list[Skipped] | None = None
) -> list[FileEntry]:
    """Return the visible files below the watch folder, or below one group.

    Parameters
    ----------
    watch_folder : Path
        The folder being watched.
    group : str or None
        Only scan this group (the top-level folder name, or
        :data:`~dicomnode.forwarder.batching.TOPLEVEL_GROUP` for loose files).
    skipped : list, optional
        With a full scan (``group`` None), receives the entries that will never be
        sent and why (see :func:`skip_reason`); hand it to :class:`SkipReport`.

    Returns
    -------
    list of FileEntry
        Files with their size and mtime; ignored files and unreadable entries are left out.
    """
    if group is None:
        return [
            e
            for e in _walk(watch_folder, PurePosixPath(), skipped)
            if not should_ignore(e.rel_path)
        ]
    if group == TOPLEVEL_GROUP:
        found: list[FileEntry] = []
        try:
            with os.scandir(watch_folder) as it:
                for entry in it:
                    rel = PurePosixPath(entry.name)
                    if should_ignore(rel):
                        continue
                    try:
                        if entry.is_file(follow_symlinks=True):
                            st = entry.stat(follow_symlinks=True)
                            found.append(FileEntry(rel, st.st_size, st.st_mtime_ns))
                    except OSError:
                        continue
        except OSError:
            pass
        return found
    top = PurePosixPath(group)
    if _skip_dir(top) or not watch_folder.joinpath(group).is_dir():
        return []
    return [e for e in _walk(watch_folder, top) if not should_ignore(e.rel_path)]


class SkipReport:
    """Log each entry the forwarder will never send once, with the reason.

    Fed with the :class:`Skipped` entries of every full scan; an entry is logged
    again only after it disappeared and came back.

    Parameters
    ----------
    watch_folder : Path
        The watch folder (log lines show full paths).
    """

    def __init__(self, watch_folder: Path) -> None:
        self.watch_folder = watch_folder
        self._logged: set[PurePosixPath] = set()

    def report(self, skipped: list[Skipped]) -> None:
        """Log the entries not logged before; forget those no longer present."""
        for entry in skipped:
            if entry.rel_path not in self._logged:
                logger.warning(
                    "SKIPPED path=%s reason=%s",
                    escape(str(self.watch_folder.joinpath(*entry.rel_path.parts))),
                    entry.reason,
                )
        self._logged = {entry.rel_path for entry in skipped}


#: Hidden folder where the receiver's conversion worker keeps one marker per pending
#: Enhanced-MR split (``dicomnode.convert.worker.PENDING_DIR``); while a group holds
#: one, the group is not complete yet.


def has_pending_conversion(watch_folder: Path, group: str) -> bool:
    """Return True when the group contains a pending-conversion marker of the receiver."""
    root = watch_folder if group == TOPLEVEL_GROUP else watch_folder / group
    if group == TOPLEVEL_GROUP:
        return _has_marker(root / CONVERT_PENDING_DIR)
    if _root_marker_names_group(watch_folder / CONVERT_PENDING_DIR, group):
        return True
    for dirpath, dirnames, _ in os.walk(root):
        if CONVERT_PENDING_DIR in dirnames and _has_marker(Path(dirpath) / CONVERT_PENDING_DIR):
            return True
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return False


def _root_marker_names_group(folder: Path, group: str) -> bool:
    """Return True when a marker at the watch folder's root (an AE folder mapped onto the
    watch folder itself) belongs to an object inside ``group``.

    A marker that cannot be read is counted as pending: waiting is safe, sending early is not.
    """
    try:
        markers = list(folder.glob("*.json"))
    except OSError:
        return False
    for marker in markers:
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
            first = PurePosixPath(str(record["path"]).replace("\\", "/")).parts[0]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return True
        if first == group:
            return True
    return False


def _has_marker(folder: Path) -> bool:
    try:
        return any(folder.glob("*.json"))
    except OSError:
        return False


class _Handler(FileSystemEventHandler):
    def __init__(self, root: Path, notify: Callable[[str], None]) -> None:
        self._root = os.path.abspath(root)
        self._notify = notify

    def _report(self, raw: str | bytes) -> None:
        path = os.fsdecode(raw)
        try:
            rel = os.path.relpath(os.path.abspath(path), self._root)
        except ValueError:
            return
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            return
        parts = PurePosixPath(*Path(rel).parts)
        if parts.parts and (parts.parts[0] == "failed" or parts.parts[0].startswith(".")):
            return
        self._notify(group_key_of(parts) if len(parts.parts) > 1 else _top_level_key(path))

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        self._report(event.src_path)
        dest = getattr(event, "dest_path", "")
        if dest:
            self._report(dest)


def _top_level_key(path: str) -> str:
    """A top-level entry is its own group if it is a folder, else the top-level group."""
    return os.path.basename(path) if os.path.isdir(path) else TOPLEVEL_GROUP


class EventSource:
    """Report the group of every file-system event below the watch folder.

    Parameters
    ----------
    watch_folder : Path
        Folder to observe recursively.
    notify : callable
        Called with the group key of each event, from the observer thread.
    """

    def __init__(self, watch_folder: Path, notify: Callable[[str], None]) -> None:
        self._watch_folder = watch_folder
        self._notify = notify
        self._observer: threading.Thread | None = None

    def start(self) -> bool:
        """Start observing; return False (and log) when events are unavailable."""
        observer = Observer()
        try:
            observer.schedule(
                _Handler(self._watch_folder, self._notify), str(self._watch_folder), recursive=True
            )
            observer.daemon = True
            observer.start()
        except (OSError, RuntimeError) as exc:
            logger.warning(
                "WATCH-EVENTS-UNAVAILABLE %s: %s (falling back to periodic rescans)",
                self._watch_folder,
                exc,
            )
            return False
        self._observer = observer
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the observer thread and wait for it."""
        observer = self._observer
        self._observer = None
        if observer is None:
            return
        observer.stop()  # type: ignore[attr-defined]
        observer.join(timeout_s)

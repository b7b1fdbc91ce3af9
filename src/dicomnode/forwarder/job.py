"""The forwarder's unit of work: a claimed group of files (job model only).

A :class:`GroupJob` is what the scheduler claims from the watch folder (or what
``dicomnode send`` builds from its arguments): its :class:`JobFile` entries
carry the size and mtime they had when claimed, and a file that no longer
matches (:func:`is_unchanged`) is neither sent nor deleted. :class:`GroupResult`
is what sending one group reports back. Plain values; no I/O but ``stat``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dicomnode.forwarder.batching import TOPLEVEL_GROUP, GroupSnapshot, ObjectInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobFile:
    """One file of a group job, with the size and mtime it had when the group was claimed.

    Attributes
    ----------
    path : Path
        The file on disk.
    display : str
        How logs name it (path relative to the watch folder or send argument).
    inside : PurePosixPath
        Path kept below ``failed/<stamp>_<group>/`` if it is parked.
    size, mtime_ns : int
        Expected size and modification time; any difference means "still changing".
    """

    path: Path
    display: str
    inside: PurePosixPath
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class GroupJob:
    """A claimed group: its files and where parked files and pruning stop.

    Attributes
    ----------
    key : str
        Group key (top-level folder name, empty for loose files).
    files : tuple of JobFile
        The group's files.
    park_root : Path
        Watch folder whose ``failed/`` receives refused files.
    prune_root : Path
        Highest folder never removed when it becomes empty.
    """

    key: str
    files: tuple[JobFile, ...]
    park_root: Path
    prune_root: Path


@dataclass(slots=True)
class GroupResult:
    """Counts and end state of one :func:`send_group` call.

    ``deferred`` counts the kept objects the target refused temporarily while it
    accepted others; ``held`` says later objects waited for them (clinical
    order); ``refusals`` holds the refusal counts of the kept files by display name;
    ``waiting`` says the RT completeness gate held the group (``RTPLAN:<uid>,…``).
    """

    sent: int = 0
    parked: int = 0
    retry: list[tuple[JobFile, ObjectInfo | None]] = field(default_factory=list)
    network_error: str | None = None
    changed: bool = False
    stopped: bool = False
    deferred: int = 0
    held: bool = False
    refusals: dict[str, int] = field(default_factory=dict)
    #: Set when the RT completeness gate holds the group: what it misses (nothing was sent).
    waiting: str = ""


def job_from_snapshot(watch_folder: Path, snap: GroupSnapshot) -> GroupJob:
    """Turn a scanned group of the watch folder into a job."""
    files = tuple(
        JobFile(
            path=watch_folder.joinpath(*e.rel_path.parts),
            display=e.rel_path.as_posix(),
            inside=PurePosixPath(*e.rel_path.parts[1:])
            if snap.key != TOPLEVEL_GROUP
            else e.rel_path,
            size=e.size,
            mtime_ns=e.mtime_ns,
        )
        for e in snap.files
    )
    return GroupJob(snap.key, files, watch_folder, watch_folder)


def is_unchanged(jf: JobFile) -> bool:
    try:
        st = jf.path.stat()
    except OSError:
        return False
    return st.st_size == jf.size and st.st_mtime_ns == jf.mtime_ns

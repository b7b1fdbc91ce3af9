"""Files a committing destination acknowledged, held on disk until it commits them.

:class:`Batch` moves (rename, same volume) or links (a hard link, else an
fsynced copy, when other destinations still need the file) each
acknowledged file into the watch folder's hidden commitment store
(:mod:`dicomnode.awaiting`), below ``held/<batch>/`` at its path relative to
the watch folder, and writes the batch's record (fsynced) when the group's
send ends. :func:`return_held` undoes a batch that has no record (a kill
before :meth:`Batch.close`): its files go back to their places, a link whose
file is still there is just removed. Used by :mod:`.commitkeeper` and the
scheduler; no sockets.

Log verbs: ``COMMIT-FAILED`` (a file that cannot be held stays and is sent
again), ``COMMIT-RESEND`` (files returned to the watch folder).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from dicomnode.awaiting import HELD_DIR, HeldFile, Record, held_folder, load_records, save_record
from dicomnode.config import COMMITMENT_STORE_NAME, DestinationConfig
from dicomnode.forwarder.batching import ObjectInfo
from dicomnode.forwarder.job import JobFile
from dicomnode.forwarder.outcome import remove_empty_parents
from dicomnode.storage import fsync_dir

logger = logging.getLogger(__name__)


class Batch:
    """The files of one group send a committing destination acknowledged (worker thread).

    Created by :meth:`~.commitkeeper.CommitmentKeeper.open_batch`; :meth:`hold`
    each acknowledged file, then :meth:`close` once.

    Parameters
    ----------
    store, watch_folder : Path
        The commitment store and the watch folder it belongs to.
    destination : DestinationConfig
        The committing destination.
    group : str
        The group key the files come from.
    on_closed : callable
        Called once the record is on disk (wakes the keeper).
    """

    def __init__(
        self,
        store: Path,
        watch_folder: Path,
        destination: DestinationConfig,
        group: str,
        on_closed: Callable[[], None],
    ) -> None:
        self.store = store
        self.watch_folder = watch_folder
        self.destination = destination
        self.group = group
        self.on_closed = on_closed
        self.key = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}"
        self.folder = held_folder(store, self.key)
        self.files: list[HeldFile] = []
        self._lock = threading.Lock()  # hold() may be called from several sending threads

    def hold(self, jf: JobFile, obj: ObjectInfo, move: bool = True, checksum: str = "") -> bool:
        """Keep an acknowledged file in the store; True when it is held (else nothing changed).

        ``move``: rename it (no other destination needs it); else hard-link it
        (a copy, fsynced, where links are impossible) and leave the file for
        the others. Raises nothing: a failure is logged and the file stays in
        the watch folder (it is sent again, never lost).
        """
        watch = self.watch_folder
        try:
            origin = jf.path.relative_to(watch).as_posix()
        except ValueError:
            origin = jf.display
        target = self.folder.joinpath(*PurePosixPath(origin).parts)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if move:
                os.replace(jf.path, target)
            else:
                _link_or_copy(jf.path, target)
        except OSError as exc:
            logger.error(
                "COMMIT-FAILED role=scu file=%s: cannot hold it for commitment (%s); it stays "
                "and is sent again",
                jf.display,
                exc,
            )
            return False
        if move:
            remove_empty_parents(jf.path, watch)
        held = HeldFile(
            obj.sop_class_uid,
            obj.sop_instance_uid,
            f"{HELD_DIR}/{self.key}/{origin}",
            origin,
            size=jf.size,
            mtime_ns=jf.mtime_ns,
            checksum=checksum,
        )
        with self._lock:
            self.files.append(held)
        return True

    def close(self) -> None:
        """Write the batch's record (fsynced) and wake the keeper; nothing when nothing is held."""
        if not self.files:
            return
        dest = self.destination
        record = Record(
            batch=self.key,
            destination=dest.name,
            ae_title=dest.ae_title,
            host=dest.host,
            port=dest.port,
            group=self.group,
            created=time.time(),
            files=tuple(self.files),
        )
        try:
            for folder in {(self.store / f.held).parent for f in self.files}:
                fsync_dir(folder)
            save_record(self.store, record)
        except OSError as exc:
            logger.error(
                "COMMIT-FAILED role=scu batch=%s: cannot write its record (%s); its %d file(s) "
                "go back to the watch folder",
                self.key,
                exc,
                len(self.files),
            )
            return_held(self.store, self.watch_folder, self.key)
            return
        self.on_closed()


def return_held(store: Path, watch_folder: Path, batch: str) -> int:
    """Move the files of a batch held without a record back to their places; return how many."""
    folder = held_folder(store, batch)
    moved = 0
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        original = watch_folder / src.relative_to(folder)
        with contextlib.suppress(OSError):
            if original.exists() and os.path.samefile(src, original):
                src.unlink()  # a link held for it while the file stayed for others
                continue
        dest = _free_name(original)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            moved += 1
        except OSError as exc:
            logger.error("COMMIT-FAILED role=scu cannot return %s: %s", src, exc)
    if not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)
    if moved:
        logger.warning(
            "COMMIT-RESEND role=scu batch=%s: %d file(s) held without a record (interrupted) "
            "returned to the watch folder to be sent again",
            batch,
            moved,
        )
    return moved


def unclaimed_batches(watch_folder: Path, committing: set[str]) -> dict[str, int]:
    """Return ``{destination: files}`` held for destinations not in ``committing``."""
    found: dict[str, int] = {}
    for record in load_records(watch_folder / COMMITMENT_STORE_NAME):
        if record.destination not in committing:
            found[record.destination] = found.get(record.destination, 0) + len(record.files)
    return found


def inside_group(group: str, origin: PurePosixPath) -> PurePosixPath:
    """Return the path of ``origin`` inside its group (what parking keeps)."""
    if group and len(origin.parts) > 1:
        return PurePosixPath(*origin.parts[1:])
    return origin


def _link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link ``src`` as ``dest``; where links are impossible, copy it (fsynced)."""
    try:
        os.link(src, dest)
        return
    except FileExistsError:
        raise
    except OSError:
        pass
    tmp = dest.with_name(f".{dest.name}.part")
    shutil.copyfile(src, tmp)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dest)


def _free_name(path: Path) -> Path:
    n = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate

"""The receive journal: one flush of a preallocated file makes an object durable.

A receiver process writes every object it is about to acknowledge, with the
name it will have, as one record into its own journal file (a circular file
of fixed size under ``<destination>/.incoming-tmp/journal/``) and flushes that
file with one ``fdatasync``; then it renames the (unflushed) temp file to its
final name and answers success. Objects finished at the same moment by the
process's associations share one flush (group commit). A background thread
later makes the placed files and their folders durable in batches (one
``syncfs`` per file system, or ``fsync`` of each file and folder where
``syncfs`` does not report errors) and only then retires their records by
writing a checkpoint into the journal's header.

Why: a new file's ``fsync`` and its folder's ``fsync`` after the rename are two
metadata commits of the file system, each ending in a disk cache flush.
Overwriting already allocated blocks of one file needs only the data written
and one cache flush, so the acknowledgement waits for one cheaper flush
instead of two (0.16 ms against 0.67 ms for a 10 KB object on the bench VM).

Recovery (:meth:`Journal.open`, before any object is served, and by the pool's
parent for every journal before its workers start): every record of the
journal's current generation not retired by the checkpoint whose checksum is
intact is compared with the file at its final name; a file that is missing or
differs is written again from the record (temp file, fsync, rename, folder
fsync), so no acknowledged object is lost and none is left partial, whatever
moment the process or the machine stopped. A record whose checksum fails was
never acknowledged (its flush had not completed) and is ignored. Then the
placed files are flushed and a new generation begins.

Log verbs: ``JOURNAL-RECOVERED``, ``JOURNAL-REPLAYED``, ``JOURNAL-REPLAY-FAILED``,
``JOURNAL-FLUSH-FAILED``, ``JOURNAL-IN-USE`` (``JOURNAL-OFF`` from the receiver).
Imports the standard library, :mod:`dicomnode.storage`, :mod:`dicomnode.errors`
and :mod:`dicomnode.logsafe`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import struct
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dicomnode.errors import StorageError
from dicomnode.logsafe import escape
from dicomnode.storage import (
    GroupSync,
    fsync_dir,
    fsync_dirs,
    fsync_path,
    start_writeback,
    syncfs,
    write_bytes_atomic,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows, where the journal is not used
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Folder of destination_dir holding the journals (in the hidden temp folder, whose
#: stale-file sweep removes files only: the journals stay).
JOURNAL_DIR: Final = ".incoming-tmp/journal"
#: File name ending of a journal (``<process prefix>receive.journal``).
JOURNAL_SUFFIX: Final = "receive.journal"
#: Whether this platform journals (Linux: ``fdatasync``, ``syncfs``); elsewhere every
#: object is fsynced with its folder.
SUPPORTED: Final = sys.platform.startswith("linux") and hasattr(os, "fdatasync")

_BLOCK: Final = 4096
#: Records start at this offset; the first block holds two checkpoint slots.
_DATA_START: Final = _BLOCK
_SLOT_OFFSETS: Final = (0, 512)
#: Checkpoint slot: magic, version, clean, generation, first unretired seq, its offset,
#: write counter (the higher of the two slots wins), reserved, CRC-32 of the rest.
_HEADER: Final = struct.Struct("<4sHHQQQQQI")
_HEADER_MAGIC: Final = b"DNJH"
#: Record header: magic, version, reserved, generation, seq, path length, data length,
#: CRC-32 of header, path and the data's CRC-32 (which follows the path).
_RECORD: Final = struct.Struct("<4sHHQQIQI")
_RECORD_MAGIC: Final = b"DNJR"
_VERSION: Final = 1
#: Larger objects are not journaled: for them writing the bytes twice (record, then
#: the placed file) costs more disk time than the second flush saves (300 CT objects of
#: 0.5 MB went from 0.75 to 0.42 of DCMTK's speed when journaled); they are fsynced
#: as a file and renamed, then their folder is fsynced.
MAX_OBJECT_BYTES: Final = 256 * 1024
#: A checkpoint is written at the latest this long after an object was placed.
CHECKPOINT_INTERVAL_S: Final = 0.25
#: Smaller journals are not made (see :func:`journal_size`).
_MIN_JOURNAL_BYTES: Final = 1 << 20
#: An appender waits at most this long for space (a failing disk); then the store is refused.
_SPACE_WAIT_S: Final = 30.0
#: Until the first wrap after an open, the blocks ahead of the records are overwritten with
#: zeros this much at a time. Blocks that were only allocated (``posix_fallocate``) turn
#: into written ones on their first write, a metadata change that the flush of every record
#: landing there must also write: 0.31 ms against 0.20 ms per 10 KB record and flush on the
#: bench VM. Zeroing a mebibyte ahead pays that once per ~100 small records: 2000 small
#: objects received in 3.42 s instead of 3.65 s (interleaved, median of 6; a journal written
#: in full beforehand: 3.13 s against 3.55 s). The next mebibyte is zeroed while half of
#: one is still ahead, and its writing started at once, so no record's flush has to write
#: it (flushes of 2.6–2.8 ms instead of 3.6–3.8 at the 99th percentile; 2.81 s vs 3.01 s).
_ZERO_AHEAD_BYTES: Final = 1 << 20


class JournalInUse(OSError):
    """The journal is locked by another live process (a second node on the same destination)."""


def journal_size(path: Path, wanted_bytes: int) -> int:
    """Return the size to give the journal ``path``: ``wanted_bytes``, unless its volume is small.

    A journal not yet that large takes at most a sixteenth of the free space
    of its volume; below 1 MiB it is not worth having (0: fsync every object).
    """
    try:
        existing = path.stat().st_size
    except OSError:
        existing = 0
    if existing >= wanted_bytes:
        return wanted_bytes
    probe = path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        room = shutil.disk_usage(probe).free + existing
    except OSError:
        return 0
    size = min(wanted_bytes, room // 16)
    return size if size >= _MIN_JOURNAL_BYTES else 0


def journal_path(destination_dir: Path, prefix: str) -> Path:
    """Return the journal file of the receiver process with temp-file ``prefix``."""
    return destination_dir / JOURNAL_DIR / f"{prefix}{JOURNAL_SUFFIX}"


def _aligned(size: int) -> int:
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


@dataclass(slots=True)
class Entry:
    """One record in the journal, from its reservation until its checkpoint."""

    seq: int
    offset: int
    end: int
    final: Path
    done: bool = False
    placed_at: float = 0.0


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    generation: int
    seq: int
    offset: int
    counter: int
    clean: bool = False


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :meth:`Journal.open` found: records replayed (file rewritten) and found intact."""

    replayed: int = 0
    intact: int = 0
    failed: int = 0


def _read_checkpoint(fd: int) -> _Checkpoint | None:
    best: _Checkpoint | None = None
    for offset in _SLOT_OFFSETS:
        raw = os.pread(fd, _HEADER.size, offset)
        if len(raw) < _HEADER.size:
            continue
        magic, version, clean, generation, seq, ckpt_offset, counter, _, crc = _HEADER.unpack(raw)
        if magic != _HEADER_MAGIC or version != _VERSION:
            continue
        if zlib.crc32(raw[: _HEADER.size - 4]) != crc:
            continue
        slot = _Checkpoint(generation, seq, ckpt_offset, counter, bool(clean))
        if best is None or slot.counter > best.counter:
            best = slot
    return best


def _pack_checkpoint(slot: _Checkpoint) -> bytes:
    head = _HEADER.pack(
        _HEADER_MAGIC,
        _VERSION,
        int(slot.clean),
        slot.generation,
        slot.seq,
        slot.offset,
        slot.counter,
        0,
        0,
    )
    return head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))


def _record_head(generation: int, seq: int, path: bytes, data_crc: int, size: int) -> bytes:
    """Return a record's header and path, its checksum covering both and the data's CRC."""
    head = _RECORD.pack(_RECORD_MAGIC, _VERSION, 0, generation, seq, len(path), size, 0)
    crc = zlib.crc32(path, zlib.crc32(head[:-4]))
    crc = zlib.crc32(struct.pack("<I", data_crc), crc)
    return head[:-4] + struct.pack("<I", crc) + path + struct.pack("<I", data_crc)


def _scan(fd: int, capacity: int, generation: int, from_seq: int) -> list[int]:
    """Return the offsets of the intact records of ``generation`` numbered ``from_seq`` or later.

    In record order. Every block start is looked at (records are block
    aligned), so a torn record hides nothing after it; a record is intact when
    its header, name and data match their checksums. Only offsets are kept: a
    record is read again when it is replayed (memory stays at one record).
    """
    wanted = _RECORD_MAGIC + struct.pack("<HHQ", _VERSION, 0, generation)
    found: dict[int, int] = {}
    offset = _DATA_START
    chunk = 1 << 20
    while offset < capacity:
        block = os.pread(fd, min(chunk, capacity - offset), offset)
        if not block:
            break
        for at in range(0, len(block), _BLOCK):
            if block[at : at + len(wanted)] != wanted:
                continue
            record = _read_record(fd, offset + at, capacity)
            if record is not None and record[0] >= from_seq:
                found[record[0]] = offset + at
        offset += len(block)
    return [found[seq] for seq in sorted(found)]


def _read_record(fd: int, offset: int, capacity: int) -> tuple[int, Path, bytes] | None:
    raw = os.pread(fd, _RECORD.size, offset)
    if len(raw) < _RECORD.size:
        return None
    _, _, _, _, seq, path_len, size, crc = _RECORD.unpack(raw)
    if path_len > 65536 or offset + _RECORD.size + path_len + 4 + size > capacity:
        return None
    rest = os.pread(fd, path_len + 4 + size, offset + _RECORD.size)
    if len(rest) < path_len + 4 + size:
        return None
    path, data_crc_raw, data = rest[:path_len], rest[path_len : path_len + 4], rest[path_len + 4 :]
    check = zlib.crc32(data_crc_raw, zlib.crc32(path, zlib.crc32(raw[:-4])))
    if check != crc or zlib.crc32(data) != struct.unpack("<I", data_crc_raw)[0]:
        return None
    return seq, Path(os.fsdecode(path)), data


def _first_unwritten(fd: int, capacity: int) -> int:
    """Return where the journal's first block not yet written lies (its end: none).

    A journal reopened after a restart has usually been written through already:
    it need not be zeroed again (see :data:`_ZERO_AHEAD_BYTES`). Blocks only
    allocated are reported as a hole by ``SEEK_HOLE`` on ext4 and XFS; where the
    file system cannot tell, the journal is zeroed ahead from the start as before.
    """
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_hole is None:
        return _DATA_START
    try:
        hole = os.lseek(fd, _DATA_START, seek_hole)
    except OSError:
        return _DATA_START
    return max(_DATA_START, min(capacity, hole // _BLOCK * _BLOCK))


def _same_content(final: Path, data: bytes) -> bool:
    try:
        if final.stat().st_size != len(data):
            return False
        return final.read_bytes() == data
    except OSError:
        return False


def flush_placed(paths: Iterable[Path]) -> None:
    """Make the files ``paths`` and their folders durable: one ``syncfs`` per file system.

    Where ``syncfs`` is not used (it did not report write errors before Linux
    5.8), each file and each folder is fsynced. A file that is gone (already
    forwarded and deleted) needs nothing.

    Raises
    ------
    OSError
        When the file system reports a write error.
    """
    paths = list(paths)
    folders = list(dict.fromkeys(p.parent for p in paths))
    by_device: dict[int, Path] = {}
    for folder in folders:
        with contextlib.suppress(OSError):
            by_device.setdefault(folder.stat().st_dev, folder)
    for folder in by_device.values():
        fd = os.open(folder, os.O_RDONLY)
        try:
            if syncfs(fd):
                continue
        finally:
            os.close(fd)
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                fsync_path(path)
        for error in fsync_dirs(folders):
            if error is not None:
                raise error
        return


class Journal:
    """One receiver process's journal (see the module text); thread-safe.

    Parameters
    ----------
    path : Path
        The journal file; created (preallocated) when missing.
    capacity_bytes : int
        Its size. Objects up to a quarter of it, and at most :data:`MAX_OBJECT_BYTES`,
        are journaled (:meth:`fits`).
    """

    def __init__(self, path: Path, capacity_bytes: int) -> None:
        self.path = path
        self.capacity = max(_aligned(capacity_bytes), _DATA_START + 4 * _BLOCK)
        self.max_object_bytes = min((self.capacity - _DATA_START) // 4, MAX_OBJECT_BYTES)
        self._fd = -1
        self._generation = 0
        self._next_seq = 1
        self._head = _DATA_START
        #: Blocks before this offset were written since the open (see _ZERO_AHEAD_BYTES).
        self._zeroed_to = _DATA_START
        self._counter = 0
        self._entries: deque[Entry] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._want_checkpoint = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._flush = GroupSync(self._flush_batch)
        #: Checkpoints written (for tests and measurements).
        self.checkpoints = 0

    # -- opening and recovery ------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, capacity_bytes: int) -> tuple[Journal, Recovery]:
        """Recover ``path`` (see the module text), begin a new generation and start the checkpointer.

        Raises
        ------
        OSError
            When the journal cannot be created, read or written.
        """
        journal = cls(path, capacity_bytes)
        recovery = journal._recover_and_reset()
        journal._thread = threading.Thread(
            target=journal._checkpointer, name="JournalCheckpoint", daemon=True
        )
        journal._thread.start()
        return journal, recovery

    def _recover_and_reset(self) -> Recovery:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            try:  # held while open: released by close or by the process's death
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise JournalInUse(
                    errno.EBUSY, f"{self.path} is in use by another process"
                ) from None
        self._fd = fd
        recovery = Recovery()
        slot = _read_checkpoint(fd)
        if slot is not None:
            self._counter = slot.counter
            self._generation = slot.generation
            if not slot.clean:
                size = os.fstat(fd).st_size
                offsets = _scan(fd, size, slot.generation, slot.seq)
                records = (_read_record(fd, offset, size) for offset in offsets)
                try:
                    recovery = _recover_records(
                        (r for r in records if r is not None), len(offsets), self.path
                    )
                except OSError:
                    os.close(fd)
                    self._fd = -1
                    raise
        if os.fstat(fd).st_size != self.capacity:
            os.ftruncate(fd, min(os.fstat(fd).st_size, self.capacity))
            try:
                os.posix_fallocate(fd, 0, self.capacity)
            except OSError:
                os.ftruncate(fd, 0)  # recovered already: give the space back
                os.close(fd)
                self._fd = -1
                raise
        # A new, unguessable generation: records of the old one (and any bytes a peer
        # sent that look like records) are never taken for this one's.
        old = self._generation
        while self._generation in (old, 0):
            self._generation = secrets.randbits(64)
        self._write_checkpoint(self._next_seq, _DATA_START)
        os.fsync(fd)
        fsync_dir(self.path.parent)
        self._zeroed_to = _first_unwritten(fd, self.capacity)
        return recovery

    def _write_checkpoint(self, seq: int, offset: int, clean: bool = False) -> None:
        self._counter += 1
        slot = _Checkpoint(self._generation, seq, offset, self._counter, clean)
        os.pwrite(self._fd, _pack_checkpoint(slot), _SLOT_OFFSETS[self._counter % 2])

    # -- the acknowledgement path --------------------------------------------------------------

    def fits(self, size: int) -> bool:
        """Return True when an object of ``size`` bytes is journaled (else fsync it as a file)."""
        return size <= self.max_object_bytes

    def commit(self, final: Path, content: bytes | bytearray) -> Entry:
        """Write the object's bytes ``content`` as a record for ``final``; flush it.

        Returns once the record is on disk; the caller then renames its temp
        file to ``final`` and tells :meth:`placed` (also when that failed).

        Raises
        ------
        OSError
            When the record cannot be written or flushed, or no space frees up
            in the journal (the object must then be refused).
        """
        name = os.fsencode(final)
        size = len(content)
        entry = self._reserve(_aligned(_RECORD.size + len(name) + 4 + size), final)
        try:
            head = _record_head(self._generation, entry.seq, name, zlib.crc32(content), size)
            written = os.pwritev(self._fd, [head, content], entry.offset)
            if written != len(head) + size:
                raise OSError(errno.EIO, f"short write to the receive journal {self.path}")
            self._flush.sync(entry)
        except BaseException:
            self.placed(entry)
            raise
        return entry

    def placed(self, entry: Entry) -> None:
        """Mark ``entry`` placed (or abandoned): it may be retired by the next checkpoint."""
        with self._cond:
            entry.done = True
            entry.placed_at = time.monotonic()
            if self._used() * 2 > self.capacity:
                self._want_checkpoint = True
            if self._want_checkpoint:
                self._cond.notify_all()

    def _flush_batch(self, items: list[object]) -> list[OSError | None]:
        os.fdatasync(self._fd)
        return [None] * len(items)

    def _reserve(self, length: int, final: Path) -> Entry:
        if length > self.capacity - _DATA_START:
            raise OSError(errno.EFBIG, "object larger than the receive journal")
        deadline = time.monotonic() + _SPACE_WAIT_S
        with self._cond:
            while True:
                offset = self._free_at(length)
                if offset is not None:
                    self._zero_ahead(offset, offset + length)
                    entry = Entry(self._next_seq, offset, offset + length, final)
                    self._next_seq += 1
                    self._head = entry.end
                    self._entries.append(entry)
                    return entry
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    raise OSError(errno.ENOSPC, "receive journal full (placed files not flushed)")
                self._want_checkpoint = True
                self._cond.notify_all()
                self._cond.wait(min(left, 1.0))

    def _zero_ahead(self, offset: int, end: int) -> None:
        """Write zeros over the free blocks ahead of a record at ``offset`` (lock held).

        Only before the first wrap after the open: everything from the head to the
        end of the file is free then. Records reserved later land on written blocks
        (their bytes replace the zeros in the page cache, under this lock's order).
        A new stretch is zeroed while half of :data:`_ZERO_AHEAD_BYTES` is still
        ahead of ``end``, and the kernel starts writing it at once: by the time
        records reach it, their flushes no longer carry it.

        Raises
        ------
        OSError
            When the zeros cannot be written (the record is then refused too).
        """
        if offset < self._head:  # wrapped: every block has been written since the open
            self._zeroed_to = self.capacity
        if end + _ZERO_AHEAD_BYTES // 2 <= self._zeroed_to:
            return
        start = max(self._zeroed_to, offset)
        stop = min(self.capacity, max(end, self._zeroed_to) + _ZERO_AHEAD_BYTES)
        if stop <= start:  # at the end of the file: all written already
            return
        os.pwrite(self._fd, bytes(stop - start), start)
        start_writeback(self._fd, start, stop - start)
        self._zeroed_to = stop

    def _free_at(self, length: int) -> int | None:
        """Return where a record of ``length`` bytes may go now, or None (lock held).

        Unretired records occupy ``[tail, head)``, wrapping at the end of the
        file; a new record never reaches ``tail`` (head == tail means empty).
        """
        head, end = self._head, self.capacity
        if not self._entries:
            return head if head + length <= end else _DATA_START
        tail = self._entries[0].offset
        if head > tail:
            if head + length <= end:
                return head
            return _DATA_START if _DATA_START + length < tail else None
        return head if head + length < tail else None

    def _used(self) -> int:
        """Return the bytes held by unretired records (lock held)."""
        if not self._entries:
            return 0
        used = self._head - self._entries[0].offset
        return used if used > 0 else used + self.capacity - _DATA_START

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpointer(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._ready_to_checkpoint():
                    self._cond.wait(CHECKPOINT_INTERVAL_S / 2)
                done = self._done_prefix()
                if self._closing and not done:
                    return
            self._checkpoint(done)

    def _ready_to_checkpoint(self) -> bool:
        """Return True when the oldest record is placed and a checkpoint is due (lock held)."""
        if not self._entries or not self._entries[0].done:
            return False
        if self._want_checkpoint or self._closing:
            return True
        return time.monotonic() - self._entries[0].placed_at >= CHECKPOINT_INTERVAL_S

    def _done_prefix(self) -> list[Entry]:
        done: list[Entry] = []
        for entry in self._entries:
            if not entry.done:
                break
            done.append(entry)
        return done

    def _checkpoint(self, done: list[Entry]) -> None:
        try:
            flush_placed([e.final for e in done])
        except OSError as exc:
            logger.error(
                "JOURNAL-FLUSH-FAILED journal=%s objects=%d reason=%s: their records are kept "
                "and replayed at the next start",
                self.path,
                len(done),
                exc.strerror or exc,
            )
            with self._cond:
                self._cond.wait(1.0)
            return
        with self._cond:
            for _ in done:
                self._entries.popleft()
            seq = self._entries[0].seq if self._entries else self._next_seq
            offset = self._entries[0].offset if self._entries else self._head
            self._want_checkpoint = False
            try:
                self._write_checkpoint(seq, offset)
            except OSError as exc:  # the retired records are durable; only the header is behind
                logger.error(
                    "JOURNAL-FLUSH-FAILED journal=%s reason=cannot write its checkpoint: %s",
                    self.path,
                    exc.strerror or exc,
                )
            self.checkpoints += 1
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._flush.sync(None)

    def close(self) -> None:
        """Retire every placed record (flush and checkpoint), stop the checkpointer, close."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)
        with self._cond:
            busy = bool(self._entries)
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                if not busy:  # all retired: the next start need not scan
                    self._write_checkpoint(self._next_seq, self._head, clean=True)
                os.fdatasync(self._fd)
            if busy:
                # An association aborted at the stop may still write its record: the
                # descriptor stays open (never reused for another file) until the exit.
                return
            os.close(self._fd)
            self._fd = -1


def _recover_records(
    records: Iterable[tuple[int, Path, bytes]], count: int, journal: Path
) -> Recovery:
    """Make every journaled object durable at its final name; return what was done.

    A file that is missing or differs from its record is written again from
    the record; the others (intact) are flushed where they are. ``records``
    yields (number, final path, bytes) one at a time; ``count`` is how many it
    holds (for the summary line).

    Raises
    ------
    OSError
        When an object could not be written (the journal must then be kept).
    """
    replayed = intact = failed = 0
    kept: list[Path] = []
    for _, final, data in records:
        try:
            if _same_content(final, data):
                intact += 1
                kept.append(final)
                continue
            write_bytes_atomic(data, final)
            replayed += 1
            logger.warning(
                "JOURNAL-REPLAYED path=%s bytes=%d journal=%s reason=the acknowledged object was "
                "missing or incomplete at its final name after a stop",
                escape(str(final)),
                len(data),
                journal,
            )
        except OSError as exc:
            failed += 1
            logger.error(
                "JOURNAL-REPLAY-FAILED path=%s journal=%s reason=%s",
                escape(str(final)),
                journal,
                exc.strerror or exc,
            )
    if kept:
        flush_placed(kept)
    if failed:
        # Starting anyway would begin a new generation and forget these objects.
        raise OSError(
            errno.EIO,
            f"{failed} acknowledged object(s) in the receive journal {journal} could not be "
            "written to their folders (see JOURNAL-REPLAY-FAILED); the journal is kept and "
            "replayed at the next start: fix the cause (free space, permissions) and start again",
        )
    if count:
        logger.info(
            "JOURNAL-RECOVERED journal=%s records=%d intact=%d replayed=%d failed=%d",
            journal,
            count,
            intact,
            replayed,
            failed,
        )
    return Recovery(replayed, intact, failed)


def recover_journals(destination_dir: Path, keep: Iterable[str]) -> Recovery:
    """Recover every journal below ``destination_dir`` (the node's start, before any process serves).

    Journals whose file names are not in ``keep`` (a previous run had more
    receiver processes) are deleted once recovered.

    Raises
    ------
    StorageError
        When a journal cannot be read or a replayed object cannot be written
        (the journal is kept: the node must not start and forget them).
    """
    folder = destination_dir / JOURNAL_DIR
    wanted = set(keep)
    total = Recovery()
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(folder.iterdir()):
            if not path.name.endswith(JOURNAL_SUFFIX) or not path.is_file():
                continue
            try:
                journal, found = Journal.open(path, path.stat().st_size)
            except JournalInUse:
                logger.warning(
                    "JOURNAL-IN-USE journal=%s reason=another process (a second node on this "
                    "destination_dir?) holds it: left alone",
                    path,
                )
                continue
            except OSError as exc:
                raise StorageError(
                    f"cannot recover the receive journal {path}: {exc.strerror or exc}"
                ) from exc
            journal.close()
            total = Recovery(
                total.replayed + found.replayed,
                total.intact + found.intact,
                total.failed + found.failed,
            )
            if path.name not in wanted:
                path.unlink()
    return total

"""Temp files for incoming data sets that survive a full disk.

pynetdicom streams each received data set into a ``NamedTemporaryFile`` from
its network thread; an ``OSError`` there (disk full, quota) kills the
association with an A-ABORT and leaves a partial file behind. The receiver
replaces that factory with :func:`spool_file`, whose files record the first
write error instead of raising it, so the transfer completes and the store
handler answers 0xA700 Out of resources. The same factory is the disk guard's
first line: below ``min_free_space_mb`` it writes nothing at all. Imports the
standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from typing import IO, Any


class SpoolFile:
    """Temp file of one incoming data set that records a write error instead of raising it.

    pynetdicom writes received fragments to a ``NamedTemporaryFile`` inside its
    network thread; an ``OSError`` there (disk full) kills the association with
    an A-ABORT and leaves a partial file. Wrapped, the transfer completes, the
    partial data is truncated away to give the space back, and the store
    handler answers 0xA700 (it checks :attr:`write_error`).

    Parameters
    ----------
    inner : file object
        The opened temporary file; ``name`` is its path.
    """

    def __init__(self, inner: IO[bytes], name: str, write_error: OSError | None = None) -> None:
        self._inner = inner
        self.name = name
        self.write_error = write_error

    @property
    def file(self) -> SpoolFile:
        """Return self (pynetdicom flushes ``tempfile.file``)."""
        return self

    @property
    def closed(self) -> bool:
        """Return True once closed."""
        return self._inner.closed

    def _failed(self, exc: OSError) -> None:
        self.write_error = exc
        with contextlib.suppress(OSError, ValueError):
            os.ftruncate(self._inner.fileno(), 0)

    def write(self, data: bytes) -> int:
        """Write ``data``; after a write error, discard it (the object is refused)."""
        if self.write_error is None:
            try:
                self._inner.write(data)
            except OSError as exc:
                self._failed(exc)
        return len(data)

    def flush(self) -> None:
        """Flush to the OS; a failure is recorded, not raised."""
        if self.write_error is None:
            try:
                self._inner.flush()
            except OSError as exc:
                self._failed(exc)

    def fileno(self) -> int:
        """Return the OS file descriptor."""
        return self._inner.fileno()

    def tell(self) -> int:
        """Return the write position."""
        return self._inner.tell()

    def close(self) -> None:
        """Close; a failing final flush is recorded, not raised."""
        try:
            self._inner.close()
        except OSError as exc:
            self.write_error = self.write_error or exc
            with contextlib.suppress(OSError):
                self._inner.close()


#: Free space (MB) below which incoming data is not written at all; set by the receiver.
_min_free_mb: float = 0.0


def set_min_free_space_mb(value: float) -> None:
    """Refuse to write incoming data while the temp folder's volume has less free space."""
    global _min_free_mb
    _min_free_mb = value


def _discard(reason: OSError) -> SpoolFile:
    """Return a spool that swallows the data set; the store handler answers 0xA700."""
    missing = os.path.join(tempfile.gettempdir(), f"unwritable-{uuid.uuid4().hex}.dcm")
    return SpoolFile(open(os.devnull, "wb"), missing, reason)


def spool_file(*args: Any, **kwargs: Any) -> SpoolFile:
    """Create the temp file of an incoming data set (replaces pynetdicom's NamedTemporaryFile).

    Called when a C-STORE request's command arrives, before any of its data: below
    the disk guard nothing is written at all (the object is refused with 0xA700).
    """
    if _min_free_mb:
        try:
            free_mb = shutil.disk_usage(tempfile.gettempdir()).free / 1e6
        except OSError:
            free_mb = float("inf")
        if free_mb < _min_free_mb:
            return _discard(
                OSError(
                    errno.ENOSPC,
                    f"free space {free_mb:.0f} MB below min_free_space_mb={_min_free_mb:g}",
                )
            )
    try:
        inner = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115 (closed by pynetdicom)
    except OSError as exc:
        # Not even an empty file could be created: swallow the data, refuse the object.
        return _discard(exc)
    return SpoolFile(inner, inner.name)


__all__ = ["SpoolFile", "set_min_free_space_mb", "spool_file"]

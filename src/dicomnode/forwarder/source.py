"""Where the forwarder's data set bytes come from: fill the SCU's PDU buffer in place.

A source is a ``fill(views, position)`` callable (:data:`Fill`) that writes the
data set bytes from ``position`` on into ``views`` (the fragments of the PDUs
of one write, between their headers). :func:`file_reader` reads an open Part
10 file with one ``preadv`` per write, :func:`memory_reader` serves converted
bytes, :func:`zero_padded` adds the trailing NULL of an odd deflate stream,
and :func:`locate_data_set` finds where the data set starts (after the File
Meta Information read by :func:`dicomnode.dul.meta.read_file_meta`). Reads
files; never writes or sends.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Final, TypeAlias

from dicomnode.dul.meta import has_preamble, read_file_meta

#: Fills the views with the data set bytes from the position on.
Fill: TypeAlias = Callable[[list[memoryview], int], None]

_HAS_PREADV: Final = hasattr(os, "preadv")
#: First read of a file: preamble + File Meta Information fit in here in practice.
_HEAD_BYTES: Final = 4096
_MAX_META_BYTES: Final = 1024 * 1024


class UnreadableFile(Exception):
    """This object cannot be sent (nothing of it went out); it is reported REFUSED."""


def memory_reader(data: bytes | bytearray) -> Fill:
    """Return a ``fill(views, position)`` serving ``data``."""
    source = memoryview(data)

    def fill(views: list[memoryview], position: int) -> None:
        for into in views:
            into[:] = source[position : position + len(into)]
            position += len(into)

    return fill


def zero_padded(fill: Fill, real_length: int) -> Fill:
    """Return ``fill`` with the bytes from ``real_length`` on given as zeros (padding)."""

    def padded(views: list[memoryview], position: int) -> None:
        inner: list[memoryview] = []
        at = position
        for into in views:
            real = max(0, min(len(into), real_length - at))
            if real:
                inner.append(into[:real])
            if real < len(into):
                into[real:] = bytes(len(into) - real)
            at += len(into)
        if inner:
            fill(inner, position)

    return padded


class SourceEnded(Exception):
    """The file ended before the announced data set length."""


def file_reader(fd: int, data_start: int) -> Fill:
    """Return a ``fill(views, position)`` reading the data set of the open file ``fd``.

    One ``preadv`` per write fills every fragment at once where the platform has it.
    """

    def fill(views: list[memoryview], position: int) -> None:
        offset = data_start + position
        pending = views
        if _HAS_PREADV:
            got = os.preadv(fd, views, offset)
            if got == sum(len(v) for v in views):
                return
            offset, pending = _after(views, offset, got)
        for into in pending:
            while len(into):
                count = os.pread(fd, len(into), offset)
                if not count:
                    raise SourceEnded(f"end of file at byte {offset}")
                into[: len(count)] = count
                into = into[len(count) :]
                offset += len(count)

    return fill


def _after(views: list[memoryview], offset: int, got: int) -> tuple[int, list[memoryview]]:
    """Return the file offset and the parts of ``views`` still to fill after ``got`` bytes."""
    rest: list[memoryview] = []
    skip = got
    for into in views:
        if skip >= len(into):
            skip -= len(into)
            continue
        rest.append(into[skip:])
        skip = 0
    return offset + got, rest


def locate_data_set(fh: io.FileIO) -> tuple[int, int]:
    """Return (offset of the data set, file size) of an open Part 10 file.

    A file without preamble and ``DICM`` is a bare data set starting at byte 0.
    The SOP Class and Instance UIDs of the C-STORE come from the data set and the
    transfer syntax from the forwarder's header read, so the File Meta
    Information need not hold them.
    """
    size = os.fstat(fh.fileno()).st_size
    want = min(size, _HEAD_BYTES)
    while True:
        fh.seek(0)
        head = fh.read(want)
        if not has_preamble(head):
            return 0, size  # a bare data set (the forwarder read its encoding from the data)
        try:
            _values, offset = read_file_meta(head, whole=len(head) >= size)
            break
        except EOFError:
            if want >= min(size, _MAX_META_BYTES):
                raise UnreadableFile("File Meta Information too large or truncated") from None
            want = min(size, want * 16, _MAX_META_BYTES)
    return offset, size

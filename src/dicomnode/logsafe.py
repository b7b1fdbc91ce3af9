"""Escape peer-supplied text before it reaches a log line or a log file.

A calling AE title, a UID, a patient name or a file name comes from a peer or
from a file the node did not write; written raw, a ``\\n`` in it starts a new,
forged log line and a ``\\t`` forges a field of ``send_errors.log``.
:func:`escape` is the one function every layer uses for such text: control
characters (C0, C1, DEL), Unicode line and paragraph separators and other
invisible format characters become ``\\xNN`` / ``\\uNNNN`` escapes and a
backslash becomes ``\\\\``, so the result is one line and the original can be
read back unambiguously. Imports the standard library only (base layer).
"""

from __future__ import annotations

from typing import Final

#: Characters escaped beside the non-printable ones (the escape character itself).
_ALWAYS: Final = frozenset("\\")


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _is_safe(ch: str) -> bool:
    # str.isprintable() is False for Unicode "Other" (Cc, Cf, Cs, Co, Cn) and
    # "Separator" (Zl, Zp, non-ASCII Zs) characters: exactly what must not reach a log.
    return ch not in _ALWAYS and ch.isprintable()


def escape(text: object) -> str:
    """Return ``text`` as one printable line that cannot forge log lines or fields.

    Parameters
    ----------
    text : object
        Peer-supplied text (``str``; bytes and other objects go through ``str()``).

    Returns
    -------
    str
        ``text`` unchanged when it holds only printable characters and no
        backslash; otherwise each control, separator or format character is
        replaced by ``\\xNN``/``\\uNNNN`` and each backslash by ``\\\\``.
    """
    value = text if isinstance(text, str) else str(text)
    if value.isprintable() and "\\" not in value:
        return value  # the common case: plain AE titles, UIDs, names
    return "".join(ch if _is_safe(ch) else _escape_char(ch) for ch in value)


def escape_message(message: str) -> str:
    """Return a formatted log message with any control character left in it escaped.

    The last line of defence in :mod:`dicomnode.logsetup` (and the receiver's
    worker processes): unlike :func:`escape` it keeps backslashes, so text a
    call site already escaped is not escaped twice, and Windows paths stay readable.
    """
    if message.isprintable():
        return message
    return "".join(ch if ch == "\\" or _is_safe(ch) else _escape_char(ch) for ch in message)


__all__ = ["escape", "escape_message"]

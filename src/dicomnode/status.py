"""Closed sets of result codes: DIMSE statuses we return and CLI exit codes.

Imports only the standard library.
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses returned by the receiver (PS3.4 B.2.3)."""

    SUCCESS = 0x0000
    #: Refused: out of resources (disk full, write error, disk guard).
    OUT_OF_RESOURCES = 0xA700
    #: Error: data set does not match SOP class.
    DATASET_MISMATCH = 0xA900
    #: Error: cannot understand (unreadable object, missing or invalid UIDs).
    CANNOT_UNDERSTAND = 0xC000
    #: Failure: processing failure (unexpected error in the node).
    PROCESSING_FAILURE = 0x0110


class ExitStatus(IntEnum):
    """Process exit codes of the ``dicomnode`` command (documented in README)."""

    OK = 0
    #: A runtime failure: echo/send failed, a file could not be delivered.
    FAILURE = 1
    #: Invalid command line or configuration.
    CONFIG_ERROR = 2
    #: The node could not start (port in use, folder not writable).
    STARTUP_ERROR = 3
    #: Interrupted by Ctrl+C before finishing (one-shot commands only).
    INTERRUPTED = 130


#: Human-readable meaning of DIMSE status codes, for logs and send_errors.log.
_STATUS_MEANINGS: dict[int, str] = {
    0x0000: "Success",
    0x0001: "Warning: requested optional attributes not supported",
    0x0107: "Warning: attribute list error",
    0x0116: "Warning: attribute value out of range",
    0xB000: "Warning: coercion of data elements",
    0xB006: "Warning: elements discarded",
    0xB007: "Warning: data set does not match SOP class",
    0x0110: "Failure: processing failure",
    0x0117: "Failure: invalid object instance",
    0x0122: "Failure: SOP class not supported",
    0x0124: "Failure: not authorized",
    0x0211: "Failure: unrecognized operation",
    0x0212: "Failure: mistyped argument",
}


def describe_status(status: int) -> str:
    """Return the meaning of a DIMSE status code.

    Parameters
    ----------
    status : int
        The (0000,0900) Status value.

    Returns
    -------
    str
        A short English description, e.g. ``"Refused: out of resources"``.
    """
    if status in _STATUS_MEANINGS:
        return _STATUS_MEANINGS[status]
    if 0xA700 <= status <= 0xA7FF:
        return "Refused: out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "Error: data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "Error: cannot understand"
    if 0xB000 <= status <= 0xBFFF:
        return "Warning"
    if status == 0xFE00:
        return "Cancel"
    return "Failure: unknown status"


def is_success_or_warning(status: int) -> bool:
    """Return True when a C-STORE status means the peer kept the object."""
    return status == 0x0000 or status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF

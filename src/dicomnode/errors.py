"""Exception hierarchy of dicomnode.

Every error the package raises on purpose derives from :class:`DicomNodeError`,
so the CLI can turn it into a one-line message and an exit code. Imports only
the standard library.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base class of all deliberate dicomnode errors."""


class ConfigError(DicomNodeError):
    """The configuration file or a command-line override is invalid."""


class StorageError(DicomNodeError):
    """An object could not be placed on disk."""


class ConversionError(DicomNodeError):
    """An Enhanced multi-frame object could not be converted."""


class SendError(DicomNodeError):
    """Sending to the target node failed."""

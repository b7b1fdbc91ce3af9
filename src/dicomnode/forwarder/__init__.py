"""Folder watcher that forwards quiet groups of DICOM files to one target node.

Public interface used by the CLI and the service: :class:`Forwarder` (long
running), :func:`send_paths` (``dicomnode send``) and :func:`retry_failed`
(``dicomnode retry-failed``). They are imported on first use, so ``dicomnode
send`` does not load the watcher (watchdog) it does not need. The package never
imports the receiver; the two meet only through the file system.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicomnode.forwarder.oneshot import retry_failed, send_paths
    from dicomnode.forwarder.scheduler import Forwarder

__all__ = ["Forwarder", "retry_failed", "send_paths"]


def __getattr__(name: str) -> object:
    """Import the public names lazily (PEP 562)."""
    if name in ("send_paths", "retry_failed"):
        from dicomnode.forwarder import oneshot

        return getattr(oneshot, name)
    if name == "Forwarder":
        from dicomnode.forwarder.scheduler import Forwarder

        return Forwarder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

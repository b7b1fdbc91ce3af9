"""Folder watcher that forwards quiet groups of DICOM files to one target node.

Public interface used by the CLI and the service: :class:`Forwarder` (long
running), :func:`send_paths` (``dicomnode send``) and :func:`retry_failed`
(``dicomnode retry-failed``). The package never imports the receiver; the two
meet only through the file system.
"""

from __future__ import annotations

from dicomnode.forwarder.oneshot import retry_failed, send_paths
from dicomnode.forwarder.scheduler import Forwarder

__all__ = ["Forwarder", "retry_failed", "send_paths"]

"""The C-STORE/C-ECHO SCP: association gate, store handler and server lifecycle."""

from __future__ import annotations

from dicomnode.receiver.server import Receiver

__all__ = ["Receiver"]

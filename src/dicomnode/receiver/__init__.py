"""The C-STORE/C-ECHO SCP: association gate, store handler and server lifecycle."""

from __future__ import annotations

from typing import Any

__all__ = ["Receiver"]


def __getattr__(name: str) -> Any:
    """Import the server (and pynetdicom) only when ``Receiver`` is used.

    The parent of a receiver process pool never serves, so it stays ~30 MB smaller.
    """
    if name == "Receiver":
        from dicomnode.receiver.server import Receiver

        return Receiver
    raise AttributeError(name)

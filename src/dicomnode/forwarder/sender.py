"""What every forwarder SCU shares: the run result, the callbacks, the base sender.

:class:`AssociationSender` holds the configuration, the TLS context, a lock for
:meth:`~AssociationSender.abort` from another thread and the reporting of the
rest of a run; :class:`~dicomnode.forwarder.lean.LeanAssociationSender` is the
one implementation (the pynetdicom-based sender was retired: its patches of
pynetdicom internals broke silently on upgrades). :func:`_converted` decodes a
file whose transfer syntax the target did not accept. Imports no network code.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.config import ForwarderConfig
from dicomnode.forwarder.batching import (
    UNCOMPRESSED_SYNTAXES,
    ContextSpec,
    ObjectInfo,
    SendOutcome,
)

logger = logging.getLogger(__name__)

#: Largest PDU we send when the peer allows unlimited PDUs.
MAX_SEND_PDU_BYTES: Final = 1024 * 1024


#: Called once per file: (object, outcome, status or None, reason).
ResultCallback = Callable[[ObjectInfo, SendOutcome, "int | None", str], None]
#: Called right before a file is sent; returning False stops the run (file changed).
CheckCallback = Callable[[ObjectInfo], bool]


@dataclass(frozen=True, slots=True)
class RunEnd:
    """How one association run ended.

    Attributes
    ----------
    network_error : str or None
        Why the remaining files were not sent (connection refused, association
        rejected or aborted, timeout, temporary refusal), or None.
    stopped : bool
        True when the run ended early on request or because a file changed.
    """

    network_error: str | None = None
    stopped: bool = False


class AssociationSender:
    """Base of the forwarder's SCU: one association per call of :meth:`run`.

    Parameters
    ----------
    config : ForwarderConfig
        Target address, AE titles, timeouts and PDU size.
    ssl_context : ssl.SSLContext or None
        Client TLS context; None for plain TCP.
    """

    def __init__(self, config: ForwarderConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.ssl_context = ssl_context
        self._lock = threading.Lock()

    def abort(self) -> None:
        """Abort the association in progress, if any (used by a forced stop)."""
        raise NotImplementedError

    def run(
        self,
        locate: Callable[[ObjectInfo], Path],
        objects: Sequence[ObjectInfo],
        contexts: Sequence[ContextSpec],
        on_result: ResultCallback,
        check: CheckCallback,
        should_stop: Callable[[], bool],
    ) -> RunEnd:
        """Send ``objects`` in the given order over one association.

        Parameters
        ----------
        locate : callable
            Returns the file of an object.
        objects : sequence of ObjectInfo
            Objects in send order.
        contexts : sequence of ContextSpec
            Presentation contexts to propose (at most 128).
        on_result : callable
            Called once per object that reached a decision: ``SENT`` (success
            or warning status), ``REFUSED`` (failure status, SOP class or
            transfer syntax not accepted, unreadable), ``RETRY`` (not delivered
            because of network trouble or a temporary refusal). Objects not
            reached because of a stop or a changed file get no callback.
        check : callable
            Asked right before each object is sent; False ends the run (stopped).
        should_stop : callable
            Polled between objects; True ends the run (stopped).

        Returns
        -------
        RunEnd
            Whether the association ended because of network trouble.
        """
        raise NotImplementedError

    def _report_rest(
        self, objects: Sequence[ObjectInfo], start: int, on_result: ResultCallback, reason: str
    ) -> None:
        for obj in objects[start:]:
            on_result(obj, SendOutcome.RETRY, None, reason)


def _converted(path: Path, obj: ObjectInfo, offered: set[str]) -> Dataset:
    """Decode ``path`` into a data set pynetdicom can encode in one of ``offered``.

    Uncompressed objects convert between uncompressed syntaxes inside pynetdicom;
    compressed ones are decompressed first (needs a pixel-data decoder).

    Raises
    ------
    ValueError
        When no offered syntax can be reached.
    """
    if not offered & UNCOMPRESSED_SYNTAXES:
        raise ValueError("no uncompressed transfer syntax accepted")
    ds = dcmread(path)
    if obj.transfer_syntax_uid not in UNCOMPRESSED_SYNTAXES:
        ds.decompress(generate_instance_uid=False)  # the object keeps its identity
    logger.info(
        "CONVERTING %s from %s for the target (accepted: %s)",
        obj.rel_path,
        obj.transfer_syntax_uid,
        ", ".join(sorted(offered)),
    )
    return ds

"""What every forwarder SCU shares: the run result, the callbacks, the base sender.

:class:`AssociationSender` holds the configuration, the TLS context, a lock for
:meth:`~AssociationSender.abort` from another thread and the reporting of the
rest of a run; :class:`~dicomnode.forwarder.lean.LeanAssociationSender` is the
one implementation (the pynetdicom-based sender was retired: its patches of
pynetdicom internals broke silently on upgrades). Imports no network code.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dicomnode.config import ForwarderConfig
from dicomnode.forwarder.batching import (
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
        self._helpers: list[AssociationSender] = []

    def helpers(self, count: int) -> list[AssociationSender]:
        """Return ``count`` more senders of the same kind for associations at once.

        They are created on first use and kept (their buffers are reused from
        group to group); :meth:`abort` aborts theirs too. Each one runs one
        association at a time, like this one.
        """
        with self._lock:
            while len(self._helpers) < count:
                self._helpers.append(type(self)(self.config, self.ssl_context))
            return self._helpers[:count]

    def _helpers_now(self) -> list[AssociationSender]:
        with self._lock:
            return list(self._helpers)

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
        idle: Callable[[], None] | None = None,
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
        idle : callable, optional
            Called while the target works on an object (its data sent, its
            response not yet read): the caller's deferred work (log lines).

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

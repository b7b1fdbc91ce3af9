"""Pure admission and routing decisions of the receiver: may this peer associate, where does it file?

No I/O, no sockets, no clock. Imports config only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dicomnode.config import DestinationConfig, ReceiverConfig

#: An AE title on the wire holds 1-16 characters of DICOM's default repertoire
#: (printable ASCII) and no backslash (PS3.5 6.2, VR AE).
_PEER_AE: Final = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of an admission check.

    Attributes
    ----------
    accept : bool
        True when the association may proceed.
    reason : str
        Why it was refused (empty when accepted).
    diagnostic : int
        A-ASSOCIATE-RJ diagnostic (0x03 calling AE, 0x07 called AE, 0x01 no reason).
    commitment_only : bool
        True when the peer is admitted only to deliver storage commitment reports
        (a committing destination of the forwarder that is not a trusted AE).
    """

    accept: bool
    reason: str = ""
    diagnostic: int = 0x01
    commitment_only: bool = False


def is_valid_peer_ae(title: str) -> bool:
    """Return True when ``title`` (padding already removed) may be used by a peer.

    One rule for every AE title a peer sends: 1 to 16 printable ASCII characters,
    no backslash. Control characters (tab, CR, LF, VT, NUL inside the title ...)
    and anything outside ASCII are refused, never normalised.
    """
    return _PEER_AE.fullmatch(title) is not None


def is_trusted(cfg: ReceiverConfig, calling_aet: str) -> bool:
    """Return True when ``calling_aet`` is in the trusted list (exact match) or ``*`` is.

    ``calling_aet`` is compared as given (padding removed by the caller): the
    same exact rule as [AE_Mappings] and [AE_Hosts].
    """
    return cfg.trusts_any_ae or calling_aet in cfg.trusted_ae_titles


def decide_association(
    cfg: ReceiverConfig,
    calling_aet: str,
    called_aet: str,
    peer_addresses: frozenset[str],
) -> Decision:
    """Decide whether an association request is admitted.

    Parameters
    ----------
    cfg : ReceiverConfig
        Receiver settings (trusted list, called-AE rule, AE host bindings).
    calling_aet, called_aet : str
        AE titles from the A-ASSOCIATE-RQ, DICOM's space padding removed
        (:func:`dicomnode.dul.pdu.ae_text`), nothing else.
    peer_addresses : frozenset of str
        The peer's IP address plus any names it resolves to (resolved by the caller).

    Returns
    -------
    Decision
        Accept, or refuse with a reason and an A-ASSOCIATE-RJ diagnostic.
    """
    calling = calling_aet
    if not is_valid_peer_ae(calling):
        return Decision(
            False, "calling AE title is empty or holds control characters or a backslash", 0x03
        )
    if not is_valid_peer_ae(called_aet):
        return Decision(
            False, "called AE title is empty or holds control characters or a backslash", 0x07
        )
    reporter = reporting_destination(cfg, calling)
    if not is_trusted(cfg, calling) and reporter is not None:
        if cfg.require_called_aet and called_aet != cfg.ae_title:
            return Decision(False, f"called AE title is not {cfg.ae_title!r}", 0x07)
        reporter_hosts = hosts_for(cfg, calling) or (reporter.host,)
        if not _host_matches(reporter_hosts, peer_addresses):
            return Decision(
                False,
                f"peer address is not {', '.join(reporter_hosts)} ([Destination:{reporter.name}] "
                "reporting storage commitment)",
                0x03,
            )
        return Decision(True, commitment_only=True)
    if not is_trusted(cfg, calling):
        hint = ""
        folded = [t for t in cfg.trusted_ae_titles if t.upper() == calling.upper()]
        if folded:
            hint = f" (AE titles are case-sensitive; {folded[0]!r} is trusted)"
        return Decision(False, f"calling AE title not in trusted_ae_titles{hint}", 0x03)
    if cfg.require_called_aet and called_aet != cfg.ae_title:
        return Decision(False, f"called AE title is not {cfg.ae_title!r}", 0x07)
    allowed = hosts_for(cfg, calling)
    if allowed is not None and not _host_matches(allowed, peer_addresses):
        return Decision(
            False, f"peer address not in [AE_Hosts] {calling} = {', '.join(allowed)}", 0x03
        )
    return Decision(True)


def reporting_destination(cfg: ReceiverConfig, calling_aet: str) -> DestinationConfig | None:
    """Return the committing destination whose reports ``calling_aet`` may deliver, or None.

    A ``[Destination:NAME]`` with ``storage_commitment = true`` is asked by the
    forwarder to commit what it acknowledged, and answers on a new association
    to the node's port. Its AE title is admitted for that alone (storage
    commitment context only, N-EVENT-REPORT only), from its configured host
    (or its [AE_Hosts] entry), even when it is not a trusted AE.
    """
    if cfg.commitment_store is None:
        return None
    return next((d for d in cfg.commitment_destinations if d.ae_title == calling_aet), None)


def _host_matches(allowed: tuple[str, ...], peer: frozenset[str]) -> bool:
    lowered = {p.lower().rstrip(".") for p in peer}
    for entry in allowed:
        item = entry.lower().rstrip(".")
        if item in lowered:
            return True
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            continue
        for p in lowered:
            try:
                if ipaddress.ip_address(p) in network:
                    return True
            except ValueError:
                continue
    return False


def route_for(receiver: ReceiverConfig, calling_aet: str) -> Path:
    """Return the folder for objects from ``calling_aet`` ([AE_Mappings] or ``incoming``).

    The AE title must match exactly (padding removed), as for trusted_ae_titles
    and [AE_Hosts]: ``bound`` is not ``BOUND``.
    """
    for aet, folder in receiver.ae_mappings:
        if aet == calling_aet:
            return folder
    return receiver.destination_dir / "incoming"


def hosts_for(receiver: ReceiverConfig, calling_aet: str) -> tuple[str, ...] | None:
    """Return the hosts ``calling_aet`` may connect from, or None when unrestricted."""
    for aet, names in receiver.ae_hosts:
        if aet == calling_aet:
            return names
    return None

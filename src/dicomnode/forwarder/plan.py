"""Read what routing and duplicate detection need from one file of a claimed group.

:func:`plan_file` reads a file's header (:func:`~.header.inspect_file`), the
File Meta Source AE Title and the ``tag:`` keywords the routes filter on, hashes
the whole file (BLAKE2b, 128 bits: the bytes are read again by the sender right
after, from the page cache) and returns a :class:`FilePlan` with the
:func:`~.routing.route_file` decision - or the :class:`~.outcome.ParkReason` of
a file that cannot be sent anywhere. Reads files; never writes, moves or sends.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

from dicomnode.config import ForwarderConfig
from dicomnode.forwarder.batching import ObjectInfo
from dicomnode.forwarder.deliveries import FileIdentity
from dicomnode.forwarder.header import inspect_file
from dicomnode.forwarder.job import JobFile
from dicomnode.forwarder.outcome import ParkReason
from dicomnode.forwarder.routing import (
    RouteDecision,
    RoutingFacts,
    needs_file_meta,
    route_file,
    tag_keywords,
)

logger = logging.getLogger(__name__)

_CHUNK: Final = 1024 * 1024
_DEFLATED: Final = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True, slots=True)
class FilePlan:
    """One file of a group, ready for its destinations.

    Attributes
    ----------
    jf : JobFile
        The file as claimed.
    info : ObjectInfo
        Its header facts.
    ident : FileIdentity
        Path, size, mtime, checksum and SOP Instance UID (the delivery store's key).
    route : RouteDecision
        Where it goes.
    """

    jf: JobFile
    info: ObjectInfo
    ident: FileIdentity
    route: RouteDecision


def checksum_of(jf: JobFile) -> str:
    """Return the BLAKE2b-128 hex digest of the file's content.

    Raises
    ------
    OSError
        When it cannot be read.
    """
    digest = hashlib.blake2b(digest_size=16)
    with jf.path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extra_facts(
    jf: JobFile, info: ObjectInfo, keywords: tuple[str, ...]
) -> tuple[str, dict[str, tuple[str, ...]]]:
    """Return (Source AE Title, tag values) of a file; empty where they cannot be read."""
    from pydicom import dcmread
    from pydicom.filereader import read_file_meta_info

    calling_ae = ""
    try:
        meta = read_file_meta_info(jf.path)
        calling_ae = str(meta.get("SourceApplicationEntityTitle", "") or "").strip()
    except Exception:  # a bare data set has no File Meta Information
        calling_ae = ""
    tags: dict[str, tuple[str, ...]] = {}
    if not keywords or info.transfer_syntax_uid == _DEFLATED:
        return calling_ae, tags  # a deflated data set is never inflated whole for routing
    try:
        ds = dcmread(jf.path, stop_before_pixels=True, force=True, specific_tags=list(keywords))
    except Exception:  # unreadable beyond the header facts: tag filters do not match
        return calling_ae, tags
    for keyword in keywords:
        elem = ds.data_element(keyword) if keyword in ds else None
        if elem is None or elem.value is None:
            continue
        value = elem.value
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            tags[keyword] = tuple(str(v).strip() for v in value)
        else:
            tags[keyword] = (str(value).strip(),)
    return calling_ae, tags


def plan_file(
    jf: JobFile, key: PurePosixPath, group: str, config: ForwarderConfig
) -> FilePlan | ParkReason:
    """Read one file and decide its destinations.

    Parameters
    ----------
    jf : JobFile
        The file.
    key : PurePosixPath
        Identifier stored as ``ObjectInfo.rel_path``.
    group : str
        The group key (its top-level folder; routes' ``folder`` filter).
    config : ForwarderConfig
        Routes, ``unrouted`` and the destinations.

    Returns
    -------
    FilePlan or ParkReason
        ParkReason when the file cannot be sent (see :func:`~.header.inspect_file`)
        or cannot be read for its checksum.
    """
    found = inspect_file(jf, key)
    if isinstance(found, ParkReason):
        return found
    try:
        checksum = checksum_of(jf)
    except OSError as exc:
        return ParkReason(None, f"unreadable: {exc.strerror or exc}", found.sop_instance_uid)
    calling_ae: str = ""
    tags: dict[str, tuple[str, ...]] = {}
    if needs_file_meta(config.routes):
        calling_ae, tags = _extra_facts(jf, found, tag_keywords(config.routes))
    facts = RoutingFacts(
        calling_ae=calling_ae,
        modality=found.modality,
        sop_class_uid=found.sop_class_uid,
        folder=group,
        tags=tags,
    )
    has_default = config.destination("default") is not None
    decision = route_file(facts, config.routes, config.unrouted, has_default)
    ident = FileIdentity(
        path=jf.display,
        size=jf.size,
        mtime_ns=jf.mtime_ns,
        checksum=checksum,
        sop_uid=found.sop_instance_uid,
    )
    return FilePlan(jf, found, ident, decision)

"""Pure decisions of the forwarder: grouping, readiness, clinical order, contexts, backoff.

Everything here is a function of its arguments: the current time is always passed
in as ``now`` (seconds, from whatever clock the caller uses consistently), nothing
writes files, opens sockets, starts threads or reads the clock. The I/O layers
(:mod:`.watcher`, :mod:`.sender`, :mod:`.outcome`, :mod:`.state`) feed it facts
and act on its answers. Imports the standard library, and pydicom (UID names)
only for a SOP class missing from :data:`_COMMON_IMAGE_CLASSES`, so a one-shot
send does not pay pydicom's import; never pynetdicom or watchdog.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Final, TypeAlias

from dicomnode.dul.meta import EXPLICIT_VR_BE, EXPLICIT_VR_LE, IMPLICIT_VR_LE
from dicomnode.dul.pdu import MAX_PRESENTATION_CONTEXTS

if TYPE_CHECKING:
    from dicomnode.forwarder.completeness import Reference

#: Name of the parked-files folder directly below the watch folder.
FAILED_DIR_NAME: Final = "failed"
#: Group key of the loose files at the top level of the watch folder.
TOPLEVEL_GROUP: Final = ""
#: Folder-name label of the top-level group (used in failed/ and in logs).
TOPLEVEL_LABEL: Final = "_toplevel"
#: File name suffixes that mark files still being written.
TEMP_SUFFIXES: Final = (".part", ".tmp")
#: Largest number of presentation contexts one association may propose (PS3.8 9.3.2.2).
MAX_CONTEXTS: Final = MAX_PRESENTATION_CONTEXTS

#: Transfer syntaxes proposed for every SOP class so the object can be converted.
FALLBACK_SYNTAXES: Final = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
UNCOMPRESSED_SYNTAXES: Final = frozenset({EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE})

_RT_BY_MODALITY: Final = {
    "RTSTRUCT": "RTSTRUCT",
    "RTPLAN": "RTPLAN",
    "RTDOSE": "RTDOSE",
    "RTRECORD": "RTRECORD",
}
_RT_BY_SOP_CLASS: Final = {
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",  # RT Plan
    "1.2.840.10008.5.1.4.1.1.481.8": "RTPLAN",  # RT Ion Plan
    "1.2.840.10008.5.1.4.1.1.481.2": "RTDOSE",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.4": "RTRECORD",  # RT Beams Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.6": "RTRECORD",  # RT Brachy Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.7": "RTRECORD",  # RT Treatment Summary Record
    "1.2.840.10008.5.1.4.1.1.481.9": "RTRECORD",  # RT Ion Beams Treatment Record
}

#: Image Storage SOP classes named here so the common case needs no UID dictionary
#: (pydicom names each "... Image Storage"; tests check it); others are looked up.
_COMMON_IMAGE_CLASSES: Final = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
        "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray - For Presentation
        "1.2.840.10008.5.1.4.1.1.2",  # CT
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
        "1.2.840.10008.5.1.4.1.1.4",  # MR
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic
        "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine
        "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
        "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    }
)


# --------------------------------------------------------------------------- files and groups


@dataclass(frozen=True, slots=True)
class FileEntry:
    """What a scan saw of one file: its path below the watch folder, size and mtime.

    Attributes
    ----------
    rel_path : PurePosixPath
        Path relative to the watch folder, ``/``-separated.
    size : int
        Size in bytes.
    mtime_ns : int
        Modification time in nanoseconds.
    """

    rel_path: PurePosixPath
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """All files of one group as seen by one scan, sorted by path.

    Attributes
    ----------
    key : str
        The top-level folder name, or :data:`TOPLEVEL_GROUP` for loose files.
    files : tuple of FileEntry
        The group's files (ignored files excluded), sorted by ``rel_path``.
    """

    key: str
    files: tuple[FileEntry, ...]

    @property
    def label(self) -> str:
        """Return the name used for the group in logs and in ``failed/`` folder names."""
        return group_label(self.key)

    @property
    def total_bytes(self) -> int:
        """Return the summed size of the group's files."""
        return sum(f.size for f in self.files)


def group_label(key: str) -> str:
    """Return the display/folder name of the group ``key``."""
    return key if key != TOPLEVEL_GROUP else TOPLEVEL_LABEL


def should_ignore(rel_path: PurePosixPath) -> bool:
    """Return True for files the forwarder must never send or park.

    Ignored are everything below ``failed/``, hidden files or anything inside a
    hidden folder (a component starting with ``.``), and temporary files
    (``*.part``, ``*.tmp``, any case).

    Parameters
    ----------
    rel_path : PurePosixPath
        Path relative to the watch folder.
    """
    parts = rel_path.parts
    if not parts:
        return True
    if parts[0] == FAILED_DIR_NAME:
        return True
    if any(p.startswith(".") for p in parts):
        return True
    return parts[-1].lower().endswith(TEMP_SUFFIXES)


def group_key_of(rel_path: PurePosixPath) -> str:
    """Return the group a file belongs to: its top-level folder, or the top-level group."""
    parts = rel_path.parts
    return parts[0] if len(parts) > 1 else TOPLEVEL_GROUP


def group_entries(entries: Iterable[FileEntry]) -> dict[str, GroupSnapshot]:
    """Split scanned files into group snapshots, dropping ignored files.

    Parameters
    ----------
    entries : iterable of FileEntry
        Files found below the watch folder.

    Returns
    -------
    dict of str to GroupSnapshot
        One snapshot per group that has at least one file.
    """
    by_group: dict[str, list[FileEntry]] = {}
    for entry in entries:
        if should_ignore(entry.rel_path):
            continue
        by_group.setdefault(group_key_of(entry.rel_path), []).append(entry)
    return {
        key: GroupSnapshot(key, tuple(sorted(files, key=lambda f: f.rel_path.parts)))
        for key, files in by_group.items()
    }


# --------------------------------------------------------------------------- readiness


@dataclass(slots=True)
class _Seen:
    snapshot: GroupSnapshot
    changed_at: float


@dataclass(slots=True)
class ReadinessTracker:
    """Decide when a group has been quiet long enough to be sent.

    A group is *ready* when the same snapshot (every file's path, size and mtime)
    has been observed for at least ``quiet_period_s`` and no change event arrived
    in that time. The tracker only remembers observations; it never looks at the
    disk or the clock.

    Parameters
    ----------
    quiet_period_s : float
        The configured ``inactivity_timeout``.
    """

    quiet_period_s: float
    _seen: dict[str, _Seen] = field(default_factory=dict)

    def observe(self, snapshot: GroupSnapshot, now: float) -> bool:
        """Record a scan of one group; return True when it differs from the last one."""
        seen = self._seen.get(snapshot.key)
        if seen is None or seen.snapshot != snapshot:
            self._seen[snapshot.key] = _Seen(snapshot, now)
            return True
        return False

    def touch(self, key: str, now: float) -> None:
        """Record a change event for group ``key`` (restarts its quiet period)."""
        seen = self._seen.get(key)
        if seen is not None:
            seen.changed_at = max(seen.changed_at, now)

    def forget(self, key: str) -> None:
        """Drop a group that no longer exists."""
        self._seen.pop(key, None)

    def group_keys(self) -> list[str]:
        """Return the groups currently known."""
        return list(self._seen)

    def snapshot(self, key: str) -> GroupSnapshot | None:
        """Return the last observed snapshot of ``key``."""
        seen = self._seen.get(key)
        return seen.snapshot if seen else None

    def is_quiet(self, key: str, now: float) -> bool:
        """Return True when ``key`` has not changed for ``quiet_period_s``."""
        seen = self._seen.get(key)
        return seen is not None and now - seen.changed_at >= self.quiet_period_s

    def quiet_groups(self, now: float) -> list[str]:
        """Return the quiet groups, the longest-quiet first."""
        quiet = [(s.changed_at, k) for k, s in self._seen.items() if self.is_quiet(k, now)]
        return [k for _, k in sorted(quiet)]


# --------------------------------------------------------------------------- order


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Header facts of one DICOM file that decide its order and presentation context.

    Attributes
    ----------
    rel_path : PurePosixPath
        Path relative to the watch folder.
    sop_class_uid, sop_instance_uid, transfer_syntax_uid : str
        From the file meta / data set.
    modality : str
        (0008,0060), may be empty.
    series_number, instance_number : int or None
        Integer values, None when missing or not a number.
    series_instance_uid, study_instance_uid : str
        (0020,000E) and (0020,000D), may be empty.
    references : tuple of Reference
        What an RT object needs at the destination before it
        (:func:`~.completeness.references_of`); empty for other objects.
    data_start : int
        Offset of the data set in the file as the header read found it (the
        SCU sends from there without reading the File Meta again); -1 when
        unknown.
    """

    rel_path: PurePosixPath
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    references: tuple[Reference, ...] = ()
    data_start: int = -1


@functools.lru_cache(maxsize=1024)
def object_category(modality: str, sop_class_uid: str) -> str:
    """Return the send-order token of an object: IMAGES, OTHER, RTSTRUCT, RTPLAN, RTDOSE, RTRECORD.

    The SOP class decides first for the RT classes, then the Modality for RT
    objects of other SOP classes, then any ``... Image Storage`` class counts as
    an image; everything else is OTHER. Never uses the file name.
    """
    if sop_class_uid in _RT_BY_SOP_CLASS:
        return _RT_BY_SOP_CLASS[sop_class_uid]
    token = _RT_BY_MODALITY.get(modality.strip().upper())
    if token:
        return token
    if sop_class_uid in _COMMON_IMAGE_CLASSES:
        return "IMAGES"
    name = uid_name(sop_class_uid) if sop_class_uid else ""
    if "Treatment Record" in name:
        return "RTRECORD"
    if "Image Storage" in name:
        return "IMAGES"
    return "OTHER"


def uid_name(uid: str) -> str:
    """Return pydicom's name of ``uid`` (the UID itself when unknown); imports pydicom."""
    from pydicom.uid import UID

    return str(UID(uid).name)


def category_rank(obj: ObjectInfo, send_order: Sequence[str]) -> int:
    """Return the position of ``obj``'s :func:`object_category` in ``send_order`` (unknown: last)."""
    category = object_category(obj.modality, obj.sop_class_uid)
    return send_order.index(category) if category in send_order else len(send_order)


def order_objects(objects: Iterable[ObjectInfo], send_order: Sequence[str]) -> list[ObjectInfo]:
    """Return ``objects`` in clinical send order.

    Sorted by the position of :func:`object_category` in ``send_order``, then
    Modality, Series Number, Instance Number (missing numbers last), and finally
    SOP Instance UID and path, only so the order is deterministic.

    Parameters
    ----------
    objects : iterable of ObjectInfo
        The group's readable DICOM objects.
    send_order : sequence of str
        Category tokens, e.g. ``ForwarderConfig.send_order``.
    """
    rank = {token: i for i, token in enumerate(send_order)}
    last = len(rank)

    def key(o: ObjectInfo) -> tuple[int, str, int, int, int, int, str, tuple[str, ...]]:
        cat = rank.get(object_category(o.modality, o.sop_class_uid), last)
        sn, inn = o.series_number, o.instance_number
        return (
            cat,
            o.modality,
            sn is None,
            sn or 0,
            inn is None,
            inn or 0,
            o.sop_instance_uid,
            o.rel_path.parts,
        )

    return sorted(objects, key=key)


# --------------------------------------------------------------------------- contexts


@dataclass(frozen=True, slots=True)
class ContextSpec:
    """One presentation context to propose: an abstract syntax and its transfer syntaxes."""

    sop_class_uid: str
    transfer_syntaxes: tuple[str, ...]


def contexts_for(sop_class_uid: str, file_syntaxes: Iterable[str]) -> list[ContextSpec]:
    """Return the contexts proposed for one SOP class.

    Each transfer syntax the files use gets a context of its own, so a target
    that supports it accepts it exactly and the files stream without decoding
    (in one shared context the target would pick its own favourite, e.g. DCMTK
    prefers Explicit VR, forcing a re-encode of Implicit VR files). One more
    context each offers Explicit and Implicit VR Little Endian, when the files
    do not use them already, as fallbacks that allow conversion. Every context
    carries exactly one transfer syntax, as DCMTK's storescu proposes them.
    """
    own = sorted(set(file_syntaxes))
    extra = [ts for ts in FALLBACK_SYNTAXES if ts not in own]
    return [ContextSpec(sop_class_uid, (ts,)) for ts in [*own, *extra]]


def plan_associations(
    objects: Sequence[ObjectInfo], max_contexts: int = MAX_CONTEXTS
) -> list[tuple[list[ObjectInfo], list[ContextSpec]]]:
    """Split ordered objects into consecutive runs that each fit one association.

    Order is kept: a new association starts only when the next object's SOP
    class would push the proposed contexts past ``max_contexts``.

    Parameters
    ----------
    objects : sequence of ObjectInfo
        Objects already in send order.
    max_contexts : int
        Limit per association (128 by the standard).

    Returns
    -------
    list of (objects, contexts)
        One entry per association, in send order.
    """
    syntaxes: dict[str, set[str]] = {}
    for o in objects:
        syntaxes.setdefault(o.sop_class_uid, set()).add(o.transfer_syntax_uid)
    needed = {sop: contexts_for(sop, ts) for sop, ts in syntaxes.items()}

    plans: list[tuple[list[ObjectInfo], list[ContextSpec]]] = []
    run: list[ObjectInfo] = []
    run_ctx: list[ContextSpec] = []
    run_sops: set[str] = set()
    for o in objects:
        if o.sop_class_uid not in run_sops:
            extra = needed[o.sop_class_uid]
            if run and len(run_ctx) + len(extra) > max_contexts:
                plans.append((run, run_ctx))
                run, run_ctx, run_sops = [], [], set()
            run_ctx = run_ctx + extra[: max(1, max_contexts - len(run_ctx))]
            run_sops.add(o.sop_class_uid)
        run.append(o)
    if run:
        plans.append((run, run_ctx))
    return plans


#: One association: its objects in send order and the contexts it proposes.
AssociationPlan: TypeAlias = tuple[list[ObjectInfo], list[ContextSpec]]


def plan_stages(
    objects: Sequence[ObjectInfo],
    send_order: Sequence[str],
    max_associations: int = 1,
    max_contexts: int = MAX_CONTEXTS,
) -> list[list[list[AssociationPlan]]]:
    """Plan the associations of ordered objects: stages run one after another, lanes at once.

    A stage is a list of lanes that run at the same time; a lane is a list of
    associations run one after another (:func:`plan_associations`, split only
    by the context limit). With ``max_associations == 1`` everything is one
    stage of one lane: the group goes over as few associations as possible, as
    it always did. With ``N > 1`` each send-order class (IMAGES, then OTHER,
    RTSTRUCT, ...; :func:`category_rank`) is a stage of its own, its objects
    dealt into up to ``N`` lanes of consecutive objects of near-equal size. A
    stage starts only when the one before has finished, so nothing of a later
    class reaches the target before every earlier object was answered.

    Parameters
    ----------
    objects : sequence of ObjectInfo
        Objects already in send order (:func:`order_objects`).
    send_order : sequence of str
        The category tokens that ordered them.
    max_associations : int
        Associations at once (at least 1).
    max_contexts : int
        Presentation contexts per association.

    Returns
    -------
    list of stages
        Each stage a list of lanes, each lane a list of ``(objects, contexts)``.
    """
    if not objects:
        return []
    if max_associations <= 1:
        return [[plan_associations(objects, max_contexts)]]
    classes: list[list[ObjectInfo]] = []
    last_rank: int | None = None
    for obj in objects:
        rank = category_rank(obj, send_order)
        if rank != last_rank:
            classes.append([])
            last_rank = rank
        classes[-1].append(obj)
    stages: list[list[list[AssociationPlan]]] = []
    for members in classes:
        lanes = min(max_associations, len(members))
        size, extra = divmod(len(members), lanes)
        stage: list[list[AssociationPlan]] = []
        start = 0
        for lane in range(lanes):
            end = start + size + (1 if lane < extra else 0)
            stage.append(plan_associations(members[start:end], max_contexts))
            start = end
        stages.append(stage)
    return stages


# --------------------------------------------------------------------------- outcome and retry


class SendOutcome(Enum):
    """What happened to one file in one send attempt."""

    #: The target answered success or warning: delete the file.
    SENT = "sent"
    #: The target refused this object for good (or it is not sendable): park it.
    REFUSED = "refused"
    #: Not delivered because of network trouble or a temporary refusal: keep, retry.
    RETRY = "retry"
    #: The target refused this object with a transient status (0xA7xx, 0xFE00) and the
    #: association went on with the next object: whether the target refuses only this
    #: object or everything is decided by what it answers next.
    DEFERRED = "deferred"
    #: Not attempted (stop requested, or the file changed): keep, decide later.
    SKIPPED = "skipped"


#: Status codes that mean "try again later" rather than "this object is refused".
def is_transient_status(status: int) -> bool:
    """Return True for statuses that do not condemn the object (out of resources, cancel)."""
    return 0xA700 <= status <= 0xA7FF or status == 0xFE00


class RefusalVerdict(Enum):
    """What a transient refusal (0xA7xx, 0xFE00) of one object means for that object."""

    #: The target refuses everything (down, out of space): retry the group, count nothing.
    TARGET_WIDE = "target-wide"
    #: The target refuses this object while it accepts others: counted, retried.
    COUNTED = "counted"
    #: Counted, and the count reached ``max_object_refusals``: park the object.
    PARK = "park"


def judge_refusal(
    previous: int, singled_out: bool | None, max_refusals: int
) -> tuple[RefusalVerdict, int]:
    """Decide a transient refusal of one object and return its new refusal count.

    Parameters
    ----------
    previous : int
        How often the target refused this object before while accepting others.
    singled_out : bool or None
        True when the target answered a later object of the same attempt (it
        accepts others), False when it refused that one too or the network failed,
        None when nothing else was tried (last object, or the next is of a later
        kind): then the refusal counts only for an object refused alone before.
    max_refusals : int
        ``max_object_refusals``.
    """
    if singled_out is None:
        singled_out = previous > 0
    if not singled_out:
        return RefusalVerdict.TARGET_WIDE, previous
    count = previous + 1
    return (RefusalVerdict.PARK if count >= max_refusals else RefusalVerdict.COUNTED), count


def backoff_delay_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Return the wait before retry number ``attempts`` (1 = after the first failure).

    The delay starts at ``initial_s`` and doubles per failed attempt up to ``max_s``.
    """
    if attempts <= 1:
        return min(initial_s, max_s)
    exponent = min(attempts - 1, 60)
    return float(min(initial_s * (2.0**exponent), max_s))


def should_give_up(first_failure: float, now: float, give_up_after_s: float) -> bool:
    """Return True once a group has failed for ``give_up_after_s`` since its first failure."""
    return now - first_failure >= give_up_after_s


def pending_summary(snapshots: Mapping[str, GroupSnapshot]) -> tuple[int, int]:
    """Return (groups, files) pending in the given snapshots."""
    return len(snapshots), sum(len(s.files) for s in snapshots.values())


__all__ = [
    "FAILED_DIR_NAME",
    "MAX_CONTEXTS",
    "TOPLEVEL_GROUP",
    "TOPLEVEL_LABEL",
    "ContextSpec",
    "FileEntry",
    "GroupSnapshot",
    "ObjectInfo",
    "ReadinessTracker",
    "RefusalVerdict",
    "SendOutcome",
    "backoff_delay_s",
    "category_rank",
    "contexts_for",
    "group_entries",
    "group_key_of",
    "group_label",
    "is_transient_status",
    "judge_refusal",
    "object_category",
    "order_objects",
    "pending_summary",
    "plan_associations",
    "should_give_up",
    "should_ignore",
]

"""RT completeness of a group (pure): what an RT object references, what is missing, wait or go.

Eclipse and other planning systems refuse an RT Dose whose plan they do not hold
("referenced Plan is not present"); a quiet period cannot tell a finished export
from half of one. Before a group is sent to a destination the forwarder asks
this module what the group is missing:

* RTDOSE and RT records (Beams, Brachy, Ion Beams Treatment Record, Treatment
  Summary Record) → the RT Plan of their ``ReferencedRTPlanSequence``;
* RTPLAN and RT Ion Plan → the RT Structure Set of ``ReferencedStructureSetSequence``;
* RTSTRUCT → each image series of ``ReferencedFrameOfReferenceSequence`` →
  ``RTReferencedStudySequence`` → ``RTReferencedSeriesSequence``.

A referenced plan or structure set is *present* when an object with that SOP
Instance UID is in the group, or the destination acknowledged it before
(``delivered``, backed by the ledger). A referenced image series is present when
at least one object of the group has that Series Instance UID, or one of the
structure set's contour images (``ContourImageSequence``) is in the group, or the
ledger shows the destination acknowledged one of those contour images (or an
object of that series). Individual contour images are not required one by one:
the failure seen in practice is a structure set sent without its images at all,
and a site that leaves out a scout or a few slices on purpose must not be held.

:class:`CompletenessTracker` remembers, per group and destination, since when a
group waits and what it was told, and decides send / wait / send anyway / park
from the facts it is given (``now`` is passed in; no clock, no files, no
logging). Imports pydicom's data set type and :mod:`.batching` only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence, Set
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Final

from dicomnode.forwarder.batching import ObjectInfo, object_category

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Reference kinds, as written in ``missing=KIND:<uid>``.
RTPLAN: Final = "RTPLAN"
RTSTRUCT: Final = "RTSTRUCT"
SERIES: Final = "SERIES"

#: Elements read (besides the usual header) to find an object's RT references.
REFERENCE_KEYWORDS: Final = (
    "ReferencedRTPlanSequence",
    "ReferencedStructureSetSequence",
    "ReferencedFrameOfReferenceSequence",
)
#: Contour image SOP UIDs kept per referenced series, as ledger evidence (bounded cost).
MAX_EVIDENCE_IMAGES: Final = 32
#: References kept per object (a hostile object cannot make the check ask the ledger unboundedly).
MAX_REFERENCES: Final = 64
#: References named in one log line or park reason (the rest are counted).
MAX_NAMED: Final = 20
#: Values of ``rt_incomplete_action``.
ACTION_SEND: Final = "send"
ACTION_PARK: Final = "park"


@dataclass(frozen=True, slots=True)
class Reference:
    """One object an RT object needs at the destination before it.

    Attributes
    ----------
    kind : str
        :data:`RTPLAN`, :data:`RTSTRUCT` (a SOP Instance UID) or :data:`SERIES`
        (a Series Instance UID).
    uid : str
        The referenced UID.
    study_uid : str
        For SERIES: the referenced study (RT Referenced Study; the structure set's
        own study when that is empty).
    images : tuple of str
        For SERIES: up to :data:`MAX_EVIDENCE_IMAGES` contour image SOP Instance UIDs.
    """

    kind: str
    uid: str
    study_uid: str = field(default="", compare=False)
    images: tuple[str, ...] = field(default=(), compare=False)

    def __str__(self) -> str:
        return f"{self.kind}:{self.uid}"


def _text(item: Dataset, keyword: str) -> str:
    """Return one element's text as stored, without pydicom's value validation (no warning)."""
    elem = item.get_item(keyword)
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    return str(value or "").strip().rstrip("\x00").strip()


def _uids(items: object, keyword: str) -> list[str]:
    """Return the non-empty UID values of ``keyword`` in the items of a sequence."""
    from pydicom.dataset import Dataset  # only RT objects get here, their header read by pydicom

    out: list[str] = []
    if not isinstance(items, Iterable):
        return out
    for item in items:
        if isinstance(item, Dataset):
            value = _text(item, keyword)
            if value:
                out.append(value)
    return out


def references_of(ds: Dataset, modality: str, sop_class_uid: str) -> tuple[Reference, ...]:
    """Return the references of one object that the destination needs before it.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The object's header, read with :data:`REFERENCE_KEYWORDS`.
    modality, sop_class_uid : str
        Decide the kind (:func:`~.batching.object_category`).

    Returns
    -------
    tuple of Reference
        Empty for images and every other class; duplicates removed, order kept.

    Raises
    ------
    Exception
        Whatever pydicom raises on a malformed sequence (the caller decides).
    """
    category = object_category(modality, sop_class_uid)
    refs: list[Reference] = []
    if category in ("RTDOSE", "RTRECORD"):
        seq = ds.get("ReferencedRTPlanSequence")
        refs = [Reference(RTPLAN, u) for u in _uids(seq, "ReferencedSOPInstanceUID")]
    elif category == "RTPLAN":
        seq = ds.get("ReferencedStructureSetSequence")
        refs = [Reference(RTSTRUCT, u) for u in _uids(seq, "ReferencedSOPInstanceUID")]
    elif category == "RTSTRUCT":
        for frame in ds.get("ReferencedFrameOfReferenceSequence") or ():
            for study in frame.get("RTReferencedStudySequence") or ():
                study_uid = _text(study, "ReferencedSOPInstanceUID") or _text(
                    ds, "StudyInstanceUID"
                )
                for series in study.get("RTReferencedSeriesSequence") or ():
                    series_uid = _text(series, "SeriesInstanceUID")
                    if not series_uid:
                        continue
                    images = _uids(series.get("ContourImageSequence"), "ReferencedSOPInstanceUID")
                    refs.append(
                        Reference(
                            SERIES, series_uid, study_uid, tuple(images[:MAX_EVIDENCE_IMAGES])
                        )
                    )
    return tuple(dict.fromkeys(r for r in refs if r.uid))[:MAX_REFERENCES]


def missing_references(
    objects: Iterable[ObjectInfo], delivered: Callable[[Reference], bool] | None = None
) -> tuple[Reference, ...]:
    """Return what the group's RT objects reference and is neither in the group nor delivered.

    Parameters
    ----------
    objects : iterable of ObjectInfo
        The group's readable objects (with ``series_instance_uid`` and ``references``).
    delivered : callable, optional
        True when the destination acknowledged the reference before (the
        ledger); asked only for what the group lacks. None: nothing was.

    Returns
    -------
    tuple of Reference
        In the order the group's objects name them, each once.
    """
    objects = list(objects)
    sops = {o.sop_instance_uid for o in objects}
    series = {o.series_instance_uid for o in objects if o.series_instance_uid}
    missing: list[Reference] = []
    seen: set[Reference] = set()
    for obj in objects:
        for ref in obj.references:
            if ref in seen:
                continue
            seen.add(ref)
            if ref.kind == SERIES:
                present = ref.uid in series or any(u in sops for u in ref.images)
            else:
                present = ref.uid in sops
            if not present and delivered is not None:
                present = delivered(ref)
            if not present:
                missing.append(ref)
    return tuple(missing)


def describe_missing(missing: Sequence[Reference]) -> str:
    """Return ``KIND:<uid>,KIND:<uid>`` (at most :data:`MAX_NAMED`, then ``,+N more``).

    Unescaped: escape before logging.
    """
    named = ",".join(str(r) for r in missing[:MAX_NAMED])
    rest = len(missing) - MAX_NAMED
    return f"{named},+{rest} more" if rest > 0 else named


class GateAction(Enum):
    """What to do with a group for one destination now."""

    #: Complete (or the check is off): send.
    SEND = "send"
    #: Something is missing and the wait is not over: keep the group, send nothing.
    WAIT = "wait"
    #: The wait is over and ``rt_incomplete_action = send``: send what is there.
    SEND_INCOMPLETE = "send-incomplete"
    #: The wait is over and ``rt_incomplete_action = park``: park the group.
    PARK = "park"


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """The answer of :meth:`CompletenessTracker.decide`.

    Attributes
    ----------
    action : GateAction
        What to do.
    missing : tuple of Reference
        What is missing (empty for SEND).
    waited_s : float
        Since when the group waits (0 when it did not).
    deadline_s : float
        How long it may wait in all.
    announce : bool
        True when this verdict is new and deserves its log line (``WAITING`` once
        per missing set, the expiry WARNING once, ``complete`` once after a wait).
    """

    action: GateAction
    missing: tuple[Reference, ...] = ()
    waited_s: float = 0.0
    deadline_s: float = 0.0
    announce: bool = False


@dataclass(slots=True)
class _Hold:
    first_ready: float
    fingerprint: Set[Hashable]
    missing: tuple[Reference, ...]
    expired_told: bool = False


@dataclass(slots=True)
class CompletenessTracker:
    """Remember which groups wait for which destination, and decide when they go.

    The wait is counted from the first check that found something missing (the
    moment the group was first ready) and is not restarted when the group
    changes; a change only makes the group be checked again. Nothing here reads
    a clock: ``now`` is passed in.
    """

    _holds: dict[tuple[str, str], _Hold] = field(default_factory=dict)

    def decide(
        self,
        group: str,
        destination: str,
        fingerprint: Set[Hashable],
        missing: tuple[Reference, ...],
        now: float,
        wait_s: float,
        action: str,
    ) -> GateVerdict:
        """Return what to do with ``group`` for ``destination`` given what it misses.

        Parameters
        ----------
        group, destination : str
            Which group, for which destination.
        fingerprint : set
            The group's content at this check (one entry per file: path, size, mtime).
            After a wait that ended in sending, content that was not there before
            (a new export into the same folder) starts a new wait; fewer files (the
            ones already sent) do not.
        missing : tuple of Reference
            :func:`missing_references` of the group for this destination.
        now : float
            Current time (monotonic seconds).
        wait_s : float
            The destination's ``rt_completeness_wait_s``; 0 turns the check off.
        action : str
            ``rt_incomplete_action``: :data:`ACTION_SEND` or :data:`ACTION_PARK`.
        """
        key = (group, destination)
        hold = self._holds.get(key)
        if wait_s <= 0 or not missing:
            if hold is not None:
                del self._holds[key]
                return GateVerdict(GateAction.SEND, (), now - hold.first_ready, wait_s, True)
            return GateVerdict(GateAction.SEND, (), 0.0, wait_s)
        if hold is not None and hold.expired_told and not fingerprint <= hold.fingerprint:
            hold = None  # new content after a wait that ended: a new wait
        if hold is None:
            hold = self._holds[key] = _Hold(now, fingerprint, ())
        announce = missing != hold.missing
        hold.fingerprint, hold.missing = fingerprint, missing
        waited = now - hold.first_ready
        if waited < wait_s:
            return GateVerdict(GateAction.WAIT, missing, waited, wait_s, announce)
        told, hold.expired_told = hold.expired_told, True
        verdict = GateAction.PARK if action == ACTION_PARK else GateAction.SEND_INCOMPLETE
        if verdict is GateAction.PARK:
            del self._holds[key]
        return GateVerdict(verdict, missing, waited, wait_s, not told or announce)

    def should_hold(
        self, group: str, destination: str, fingerprint: Set[Hashable], now: float, wait_s: float
    ) -> bool:
        """Return True while ``group`` waits for ``destination``, unchanged, within its wait.

        A group that changed since its last check (another fingerprint) or whose
        wait is over is not held: it is to be checked (claimed) again.
        """
        hold = self._holds.get((group, destination))
        if hold is None or hold.expired_told:
            return False
        return hold.fingerprint == fingerprint and now - hold.first_ready < wait_s

    def forget(self, group: str) -> None:
        """Drop every hold of ``group`` (it left the watch folder)."""
        for key in [k for k in self._holds if k[0] == group]:
            del self._holds[key]

    def waiting(self) -> dict[tuple[str, str], tuple[tuple[Reference, ...], float]]:
        """Return ``(group, destination) -> (missing, since)`` of the groups that wait."""
        return {k: (h.missing, h.first_ready) for k, h in self._holds.items() if not h.expired_told}


__all__ = [
    "ACTION_PARK",
    "ACTION_SEND",
    "MAX_EVIDENCE_IMAGES",
    "MAX_NAMED",
    "MAX_REFERENCES",
    "REFERENCE_KEYWORDS",
    "RTPLAN",
    "RTSTRUCT",
    "SERIES",
    "CompletenessTracker",
    "GateAction",
    "GateVerdict",
    "Reference",
    "describe_missing",
    "missing_references",
    "references_of",
]

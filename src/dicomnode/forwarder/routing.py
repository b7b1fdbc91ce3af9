"""Route decisions: which destinations one file goes to (pure).

:func:`route_file` applies the ``[Route:NAME]`` sections to the header facts of
one file (:class:`RoutingFacts`): every filter a route sets must match (a list
matches any of its values), the file goes to the union of the destinations of
every route it matches, and a file no route matches goes to ``default`` or is
parked, as ``[FolderWatcher] unrouted`` says. No route sections at all means
everything goes to ``default`` (the single-target configuration). Takes values,
returns a decision: opens no file, reads no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from dicomnode.config import DEFAULT_DESTINATION, RouteConfig


@dataclass(frozen=True, slots=True)
class RoutingFacts:
    """What routes look at in one file.

    Attributes
    ----------
    calling_ae : str
        File Meta Source Application Entity Title (0002,0016), which the receiver
        sets to the sender's calling AE title; empty when absent.
    modality, sop_class_uid : str
        (0008,0060) and the SOP Class UID.
    folder : str
        The group's top-level folder name (empty for loose files).
    tags : mapping of str to tuple of str
        Values of the keywords routes filter on (``tag:<Keyword>``), one string
        per value of a multi-valued element; absent elements are left out.
    """

    calling_ae: str = ""
    modality: str = ""
    sop_class_uid: str = ""
    folder: str = ""
    tags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a file goes.

    Attributes
    ----------
    destinations : tuple of str
        Destination names, in route order without repeats; empty when the file is parked.
    routes : tuple of str
        Names of the routes that matched (empty for the fallback).
    reason : str
        Why the file is parked when ``destinations`` is empty, else empty.
    """

    destinations: tuple[str, ...]
    routes: tuple[str, ...] = ()
    reason: str = ""


def _any_glob(values: Sequence[str], globs: Sequence[str]) -> bool:
    return any(fnmatchcase(v, g) for v in values for g in globs)


def matches(route: RouteConfig, facts: RoutingFacts) -> bool:
    """Return True when every filter ``route`` sets matches ``facts``.

    ``calling_ae`` compares exactly (surrounding spaces ignored), ``modality``
    without regard to case, ``sop_class`` by UID, ``folder`` and ``tag:`` by
    case-sensitive glob; a ``tag:`` filter on an absent element does not match.
    """
    if route.calling_ae and facts.calling_ae.strip() not in route.calling_ae:
        return False
    if route.modality and facts.modality.strip().upper() not in route.modality:
        return False
    if route.sop_class and facts.sop_class_uid not in route.sop_class:
        return False
    if route.folder and not _any_glob((facts.folder,), route.folder):
        return False
    for keyword, globs in route.tags:
        values = facts.tags.get(keyword)
        if not values or not _any_glob(values, globs):
            return False
    return True


def route_file(
    facts: RoutingFacts,
    routes: Sequence[RouteConfig],
    unrouted: str,
    has_default: bool,
) -> RouteDecision:
    """Return the destinations of one file.

    Parameters
    ----------
    facts : RoutingFacts
        The file's header facts.
    routes : sequence of RouteConfig
        The ``[Route:NAME]`` sections; empty means everything to ``default``.
    unrouted : {"default", "park"}
        What happens to a file no route matches.
    has_default : bool
        Whether the destination ``default`` exists.

    Returns
    -------
    RouteDecision
        The union of the matching routes' destinations, or the fallback.
    """
    matched = [r for r in routes if matches(r, facts)]
    if matched:
        names = tuple(dict.fromkeys(n for r in matched for n in r.destinations))
        return RouteDecision(names, tuple(r.name for r in matched))
    if has_default and (not routes or unrouted == "default"):
        return RouteDecision((DEFAULT_DESTINATION,))
    if not routes:
        return RouteDecision((), reason="no destination configured")
    return RouteDecision(
        (),
        reason=f"no route matches (modality={facts.modality or '-'} "
        f"sop_class={facts.sop_class_uid or '-'} calling_ae={facts.calling_ae or '-'}) "
        f"and [FolderWatcher] unrouted = {unrouted}"
        + ("" if has_default else " (no destination default)"),
    )


def needs_file_meta(routes: Sequence[RouteConfig]) -> bool:
    """Return True when a route filters on something beyond modality, SOP class and folder."""
    return any(r.calling_ae or r.tags for r in routes)


def tag_keywords(routes: Sequence[RouteConfig]) -> tuple[str, ...]:
    """Return the keywords the routes' ``tag:`` filters read, without repeats."""
    return tuple(dict.fromkeys(kw for r in routes for kw, _ in r.tags))

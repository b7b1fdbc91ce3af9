"""Routing decisions, per-destination delivery states and their configuration (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode import config
from dicomnode.config import RouteConfig
from dicomnode.errors import ConfigError
from dicomnode.forwarder.fanout import (
    Action,
    DeliveryState,
    is_settled,
    next_action,
    pending_destinations,
)
from dicomnode.forwarder.routing import RoutingFacts, matches, route_file

CT = "1.2.840.10008.5.1.4.1.1.2"
PLAN = "1.2.840.10008.5.1.4.1.1.481.5"

BASE = """
[Security]
trusted_ae_titles = *
[FolderWatcher]
target_aet = PACS
target_ip = 127.0.0.1
target_port = 104
[Destination:TPS]
ae_title = TPS_AE
host = 127.0.0.1
port = 105
[Destination:QA]
ae_title = QA_AE
host = 127.0.0.1
port = 106
"""


def load(text: str, tmp_path: Path) -> config.NodeConfig:
    return config.parse(BASE + text, "test.ini", tmp_path)


def facts(**kw: object) -> RoutingFacts:
    values: dict[str, object] = {"modality": "CT", "sop_class_uid": CT, "folder": "PAT1"}
    values.update(kw)
    return RoutingFacts(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- routing


def test_routing_without_routes_sends_everything_to_default() -> None:
    decision = route_file(facts(), (), "default", has_default=True)
    assert decision.destinations == ("default",)


def test_routing_union_of_every_matching_route_in_order() -> None:
    routes = (
        RouteConfig(name="plans", destinations=("TPS", "QA"), modality=("RTPLAN",)),
        RouteConfig(name="all", destinations=("default", "TPS")),
    )
    plan = route_file(facts(modality="rtplan", sop_class_uid=PLAN), routes, "park", True)
    assert plan.destinations == ("TPS", "QA", "default")
    assert plan.routes == ("plans", "all")
    ct = route_file(facts(), routes, "park", True)
    assert ct.destinations == ("default", "TPS")


def test_routing_every_filter_must_match_and_a_list_matches_any_value() -> None:
    route = RouteConfig(
        name="r",
        destinations=("TPS",),
        calling_ae=("ECLIPSE", "MONACO"),
        sop_class=(PLAN, CT),
        folder=("QA_*",),
        tags=(("StudyDescription", ("*Head*", "*Brain*")),),
    )
    good = facts(
        calling_ae="MONACO",
        folder="QA_17",
        tags={"StudyDescription": ("CT Brain w/o",)},
    )
    assert matches(route, good)
    assert not matches(route, facts(calling_ae="OTHER", folder="QA_17", tags=good.tags))
    assert not matches(route, facts(calling_ae="MONACO", folder="PAT1", tags=good.tags))
    assert not matches(route, facts(calling_ae="MONACO", folder="QA_1", tags={}))
    assert not matches(
        route, facts(calling_ae="MONACO", folder="QA_1", tags={"StudyDescription": ("Pelvis",)})
    )
    assert not matches(route, facts(calling_ae="MONACO", folder="QA_1", sop_class_uid="1.2.3"))


def test_routing_multi_valued_tag_matches_any_of_its_values() -> None:
    route = RouteConfig(name="r", destinations=("QA",), tags=(("ImageType", ("LOCALIZER",)),))
    assert matches(route, facts(tags={"ImageType": ("ORIGINAL", "PRIMARY", "LOCALIZER")}))
    assert not matches(route, facts(tags={"ImageType": ("ORIGINAL", "PRIMARY", "AXIAL")}))


def test_routing_unmatched_goes_to_default_or_is_parked_with_a_reason() -> None:
    routes = (RouteConfig(name="plans", destinations=("TPS",), modality=("RTPLAN",)),)
    assert route_file(facts(), routes, "default", True).destinations == ("default",)
    parked = route_file(facts(), routes, "park", True)
    assert parked.destinations == ()
    assert "no route matches" in parked.reason and "modality=CT" in parked.reason
    assert route_file(facts(), routes, "default", False).destinations == ()


# --------------------------------------------------------------------------- states


def test_state_next_action_progress_duplicate_and_window() -> None:
    now = 10_000.0
    assert next_action(None, None, now, 3600) is Action.SEND
    assert next_action(DeliveryState.ACKNOWLEDGED, None, now, 3600) is Action.DONE
    assert next_action(DeliveryState.REFUSED, None, now, 0) is Action.DONE
    # acknowledged from another file with the same UID and content
    assert next_action(None, now - 10, now, 3600) is Action.SKIP_DUPLICATE
    assert next_action(None, now - 4000, now, 3600) is Action.SEND  # outside the window
    assert next_action(None, now - 10, now, 0) is Action.SEND  # window 0 = off
    assert next_action(None, now + 100, now, 3600) is Action.SEND  # clock went back
    # a destination with storage commitment is done only when committed
    assert next_action(DeliveryState.ACKNOWLEDGED, None, now, 0, True) is Action.SEND
    assert next_action(DeliveryState.COMMITTED, None, now, 0, True) is Action.DONE


def test_state_settled_only_when_every_routed_destination_is_final() -> None:
    states = {"A": DeliveryState.ACKNOWLEDGED, "B": DeliveryState.REFUSED}
    assert is_settled(("A", "B"), states)
    assert not is_settled(("A", "B", "C"), states)
    assert pending_destinations(("A", "B", "C"), states) == ("C",)
    assert is_settled(("A", "C"), {**states, "C": DeliveryState.DUPLICATE})
    assert not is_settled((), {})
    assert not is_settled(("A",), {"A": DeliveryState.PENDING})
    assert not is_settled(("A",), states, requires_commitment=frozenset({"A"}))


# --------------------------------------------------------------------------- configuration


def test_config_routes_resolve_keywords_and_lists(tmp_path: Path) -> None:
    cfg = load(
        "[Route:plans]\ndestinations = TPS, QA\nmodality = rtplan\n"
        "sop_class = RTPlanStorage, 1.2.3.4\ntag:StudyDescription = *QA*, *Test*\n"
        "calling_ae = ECLIPSE\nfolder = \n",
        tmp_path,
    )
    (route,) = cfg.forwarder.routes
    assert route.destinations == ("TPS", "QA")
    assert route.modality == ("RTPLAN",)
    assert route.sop_class == (PLAN, "1.2.3.4")
    assert route.tags == (("StudyDescription", ("*QA*", "*Test*")),)
    assert route.calling_ae == ("ECLIPSE",)
    assert route.folder == ()
    names = [d.name for d in cfg.forwarder.routed_destinations()]
    assert names == ["default", "TPS", "QA"]
    text = "\n".join(config.describe(cfg))
    assert "[Route:plans]" in text and "tag:StudyDescription = *QA*, *Test*" in text
    assert "# forwarder destination TPS: TPS_AE@127.0.0.1:105" in text


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ("[Route:r]\ndestinations = NOPE\n", "[Route:r] destinations: unknown destination 'NOPE'"),
        ("[Route:r]\nmodality = CT\n", "[Route:r] destinations is missing"),
        ("[Route:r]\ndestinations = TPS\nsop_class = CTImage\n", "[Route:r] sop_class 'CTImage'"),
        ("[Route:r]\ndestinations = TPS\ntag:NoSuchKeyword = x\n", "tag:NoSuchKeyword"),
        ("[Route:r]\ndestinations = TPS\ncolour = red\n", "[Route:r] unknown key 'colour'"),
        (
            "[Destination:default]\nae_title = X\nhost = h\n",
            "both define the destination 'default'",
        ),
        ("[route:r]\ndestinations = TPS\n", "must be spelled [Route:...]"),
        ("[Destination:my pacs]\nae_title = X\nhost = h\n", "the name must be 1-64 letters"),
        ("[Destination:TLS1]\nae_title = X\nhost = h\ntls = true\n", "tls = true needs [TLS]"),
    ],
)
def test_config_route_errors_name_section_and_key(
    tmp_path: Path, section: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(section, tmp_path)
    assert needle in str(info.value)


def test_config_destination_overrides_fall_back_to_folderwatcher(tmp_path: Path) -> None:
    cfg = load(
        "[Destination:SLOW]\nae_title = SLOW\nhost = 10.0.0.1\ncalling_aet = US\n"
        "retry_initial_delay_s = 5\nmax_associations = 4\n",
        tmp_path,
    )
    fw = cfg.forwarder
    slow = fw.destination("SLOW")
    assert slow is not None and slow.max_associations == 4
    aimed = fw.for_destination(slow)
    assert (aimed.target_aet, aimed.target_ip, aimed.calling_aet) == ("SLOW", "10.0.0.1", "US")
    assert aimed.retry_initial_delay_s == 5
    assert aimed.retry_max_delay_s == fw.retry_max_delay_s
    default = fw.destination("default")
    assert default is not None and fw.for_destination(default).calling_aet == fw.calling_aet
    # no routes: only default receives files (named ones serve echo / commitment)
    assert [d.name for d in fw.routed_destinations()] == ["default"]


def test_config_routes_without_default_park_unrouted(tmp_path: Path) -> None:
    text = BASE.replace("target_aet = PACS\ntarget_ip = 127.0.0.1\n", "")
    cfg = config.parse(text + "[Route:r]\ndestinations = TPS\n", "t.ini", tmp_path)
    assert cfg.forwarder.forwards and cfg.forwarder.unrouted == "park"
    assert [d.name for d in cfg.forwarder.routed_destinations()] == ["TPS"]

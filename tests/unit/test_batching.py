"""Pure forwarder decisions: ignore rules, grouping, readiness, clinical order, contexts, backoff."""

from __future__ import annotations

import random
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomnode.config import DEFAULT_SEND_ORDER
from dicomnode.forwarder.batching import (
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    TOPLEVEL_GROUP,
    FileEntry,
    ObjectInfo,
    ReadinessTracker,
    backoff_delay_s,
    contexts_for,
    group_entries,
    is_transient_status,
    object_category,
    order_objects,
    plan_associations,
    should_give_up,
    should_ignore,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
RTPLAN = "1.2.840.10008.5.1.4.1.1.481.5"
RTDOSE = "1.2.840.10008.5.1.4.1.1.481.2"
RTRECORD = "1.2.840.10008.5.1.4.1.1.481.4"
REG = "1.2.840.10008.5.1.4.1.1.66.1"  # Spatial Registration
JPEG_LS = "1.2.840.10008.1.2.4.80"


def entry(path: str, size: int = 10, mtime_ns: int = 1) -> FileEntry:
    return FileEntry(PurePosixPath(path), size, mtime_ns)


def obj(
    name: str, sop: str, modality: str, series: int | None = 1, inst: int | None = 1
) -> ObjectInfo:
    return ObjectInfo(
        PurePosixPath(name), sop, f"uid.{name}", EXPLICIT_VR_LE, modality, series, inst
    )


@pytest.mark.parametrize(
    "path",
    [
        "failed/20260101-000000_P/x.dcm",
        ".dicomnode-state/retry-1.json",
        "P/.hidden.dcm",
        "P/.incoming-tmp/a.dcm",
        "P/a.dcm.part",
        "P/a.TMP",
        "loose.part",
    ],
)
def test_batching_ignores_failed_hidden_and_temporary(path: str) -> None:
    assert should_ignore(PurePosixPath(path))


@pytest.mark.parametrize(
    "path", ["P/a.dcm", "P/sub/deeper/b", "loose.dcm", "failedX/a.dcm", "P/failed/a"]
)
def test_batching_keeps_regular_files(path: str) -> None:
    assert not should_ignore(PurePosixPath(path))


def test_batching_groups_by_top_level_folder_and_loose_files() -> None:
    groups = group_entries(
        [
            entry("A/1.dcm"),
            entry("A/x/2.dcm"),
            entry("B/3.dcm"),
            entry("l1.dcm"),
            entry("l2.dcm"),
            entry("failed/F/4.dcm"),
            entry("A/5.part"),
        ]
    )
    assert set(groups) == {"A", "B", TOPLEVEL_GROUP}
    assert [f.rel_path.as_posix() for f in groups["A"].files] == ["A/1.dcm", "A/x/2.dcm"]
    assert len(groups[TOPLEVEL_GROUP].files) == 2
    assert groups[TOPLEVEL_GROUP].label == "_toplevel"


def test_batching_ready_only_after_quiet_period_of_unchanged_snapshot() -> None:
    tracker = ReadinessTracker(quiet_period_s=5.0)
    snap1 = group_entries([entry("A/1.dcm", size=10)])["A"]
    snap2 = group_entries([entry("A/1.dcm", size=20)])["A"]
    assert tracker.observe(snap1, now=100.0)
    assert not tracker.is_quiet("A", 104.9)
    assert not tracker.observe(snap1, now=104.0)  # same snapshot: no reset
    assert tracker.is_quiet("A", 105.0)
    assert tracker.observe(snap2, now=105.0)  # file grew: quiet period restarts
    assert not tracker.is_quiet("A", 109.9)
    assert tracker.quiet_groups(110.0) == ["A"]
    tracker.touch("A", 110.0)  # an event restarts it too
    assert tracker.quiet_groups(114.0) == []
    assert tracker.quiet_groups(115.0) == ["A"]


def test_batching_mtime_change_alone_resets_quiet_period() -> None:
    tracker = ReadinessTracker(quiet_period_s=1.0)
    tracker.observe(group_entries([entry("A/1", mtime_ns=1)])["A"], 0.0)
    assert tracker.observe(group_entries([entry("A/1", mtime_ns=2)])["A"], 0.9)
    assert not tracker.is_quiet("A", 1.5)


def test_batching_category_by_header_not_name() -> None:
    assert object_category("CT", CT) == "IMAGES"
    assert object_category("", MR) == "IMAGES"
    assert object_category("RTSTRUCT", RTSTRUCT) == "RTSTRUCT"
    assert object_category("", RTPLAN) == "RTPLAN"
    assert object_category("RTDOSE", RTDOSE) == "RTDOSE"
    assert object_category("RTRECORD", RTRECORD) == "RTRECORD"
    assert object_category("REG", REG) == "OTHER"


def test_batching_order_images_other_rt_then_series_instance() -> None:
    objs = [
        obj("z_dose", RTDOSE, "RTDOSE"),
        obj("y_plan", RTPLAN, "RTPLAN"),
        obj("x_struct", RTSTRUCT, "RTSTRUCT"),
        obj("w_rec", RTRECORD, "RTRECORD"),
        obj("v_reg", REG, "REG"),
        obj("c_ct_s2_i1", CT, "CT", series=2, inst=1),
        obj("b_ct_s1_i10", CT, "CT", series=1, inst=10),
        obj("a_ct_s1_i2", CT, "CT", series=1, inst=2),
        obj("d_ct_none", CT, "CT", series=1, inst=None),
    ]
    random.Random(4).shuffle(objs)
    names = [o.rel_path.name for o in order_objects(objs, DEFAULT_SEND_ORDER)]
    assert names == [
        "a_ct_s1_i2",
        "b_ct_s1_i10",
        "d_ct_none",
        "c_ct_s2_i1",
        "v_reg",
        "x_struct",
        "y_plan",
        "z_dose",
        "w_rec",
    ]


def test_batching_order_follows_configured_send_order() -> None:
    objs = [obj("s", RTSTRUCT, "RTSTRUCT"), obj("d", RTDOSE, "RTDOSE"), obj("c", CT, "CT")]
    order = ("RTDOSE", "IMAGES", "OTHER", "RTSTRUCT", "RTPLAN", "RTRECORD")
    assert [o.rel_path.name for o in order_objects(objs, order)] == ["d", "c", "s"]


@given(st.permutations(list(range(12))))
def test_batching_order_is_independent_of_input_order(perm: list[int]) -> None:
    base = [
        obj(f"f{i}", CT if i < 6 else RTDOSE, "CT" if i < 6 else "RTDOSE", 1, i) for i in range(12)
    ]
    shuffled = [base[i] for i in perm]
    assert order_objects(shuffled, DEFAULT_SEND_ORDER) == order_objects(base, DEFAULT_SEND_ORDER)


def test_batching_contexts_offer_own_syntax_and_uncompressed_fallback() -> None:
    specs = contexts_for(CT, [JPEG_LS, EXPLICIT_VR_LE])
    assert [s.transfer_syntaxes for s in specs] == [
        (EXPLICIT_VR_LE,),
        (JPEG_LS,),
        (IMPLICIT_VR_LE,),
    ]
    # the file's own syntax stands alone, so the target cannot pick another one for it
    specs = contexts_for(CT, [IMPLICIT_VR_LE])
    assert [s.transfer_syntaxes for s in specs] == [(IMPLICIT_VR_LE,), (EXPLICIT_VR_LE,)]


def test_batching_splits_associations_beyond_128_contexts_keeping_order() -> None:
    objs = [obj(f"f{i:03d}", f"1.2.3.{i}", "OT", 1, i) for i in range(200)]
    plans = plan_associations(objs)
    assert len(plans) == 4  # two contexts per SOP class: 64 classes per association
    assert all(len(contexts) <= 128 for _, contexts in plans)
    assert [o for run, _ in plans for o in run] == objs
    used = {o.sop_class_uid for o in plans[0][0]}
    assert {c.sop_class_uid for c in plans[0][1]} == used


def test_batching_one_association_for_a_normal_group() -> None:
    objs = [obj("c", CT, "CT"), obj("s", RTSTRUCT, "RTSTRUCT"), obj("d", RTDOSE, "RTDOSE")]
    plans = plan_associations(objs)
    assert len(plans) == 1 and len(plans[0][1]) == 6


def test_batching_backoff_doubles_to_maximum_and_gives_up() -> None:
    assert [backoff_delay_s(n, 30, 600) for n in range(1, 8)] == [30, 60, 120, 240, 480, 600, 600]
    assert backoff_delay_s(10_000, 30, 600) == 600
    assert not should_give_up(1000.0, 1000.0 + 86399, 86400)
    assert should_give_up(1000.0, 1000.0 + 86400, 86400)


def test_batching_transient_statuses() -> None:
    assert is_transient_status(0xA700) and is_transient_status(0xA7FF)
    assert not is_transient_status(0xC000)
    assert not is_transient_status(0x0122)
    assert not is_transient_status(0xA900)


def test_judge_refusal_counts_only_refusals_of_one_object() -> None:
    from dicomnode.forwarder.batching import RefusalVerdict, judge_refusal

    # the target answered a later object: the refusal was this object's own
    assert judge_refusal(0, True, 3) == (RefusalVerdict.COUNTED, 1)
    assert judge_refusal(2, True, 3) == (RefusalVerdict.PARK, 3)
    assert judge_refusal(0, True, 1) == (RefusalVerdict.PARK, 1)
    # the target refused the next object too, or the network failed: nothing counted
    assert judge_refusal(2, False, 3) == (RefusalVerdict.TARGET_WIDE, 2)
    # nothing else tried: counts only for an object singled out before
    assert judge_refusal(0, None, 3) == (RefusalVerdict.TARGET_WIDE, 0)
    assert judge_refusal(1, None, 3) == (RefusalVerdict.COUNTED, 2)
    assert judge_refusal(2, None, 3) == (RefusalVerdict.PARK, 3)


def test_common_image_classes_are_image_storage_classes_by_pydicom() -> None:
    """The built-in table only saves the UID dictionary lookup: pydicom agrees with each entry."""
    from pydicom.uid import UID

    from dicomnode.forwarder.batching import _COMMON_IMAGE_CLASSES, object_category

    for uid in _COMMON_IMAGE_CLASSES:
        assert "Image Storage" in UID(uid).name, uid
        assert object_category("", uid) == "IMAGES"
    # classes outside the table are still looked up by name
    assert object_category("", "1.2.840.10008.5.1.4.1.1.77.1.4") == "IMAGES"  # VL Photographic
    assert object_category("", "1.2.840.10008.5.1.4.1.1.88.22") == "OTHER"  # Enhanced SR


def test_send_path_does_not_import_pydicom() -> None:
    """A plain send reads headers with the node's own walker: pydicom stays unimported."""
    import subprocess
    import sys

    code = (
        "import sys, dicomnode.cli, dicomnode.forwarder, dicomnode.forwarder.header, "
        "dicomnode.forwarder.lean, dicomnode.forwarder.oneshot; "
        "print('pydicom' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- parallel associations


def _group(images: int) -> list[ObjectInfo]:
    objs = [obj(f"ct{i:03d}", CT, "CT", 1, i) for i in range(images)]
    objs += [
        obj("rs", RTSTRUCT, "RTSTRUCT"),
        obj("rp", RTPLAN, "RTPLAN"),
        obj("rd1", RTDOSE, "RTDOSE"),
        obj("rd2", RTDOSE, "RTDOSE"),
    ]
    return order_objects(objs, DEFAULT_SEND_ORDER)


def test_plan_stages_one_association_is_todays_single_run() -> None:
    from dicomnode.forwarder.batching import plan_stages

    ordered = _group(10)
    assert plan_stages(ordered, DEFAULT_SEND_ORDER, 1) == [[plan_associations(ordered)]]
    assert plan_stages([], DEFAULT_SEND_ORDER, 4) == []


def test_plan_stages_deals_each_class_into_lanes_and_keeps_the_class_barrier() -> None:
    from dicomnode.forwarder.batching import category_rank, plan_stages

    ordered = _group(10)
    stages = plan_stages(ordered, DEFAULT_SEND_ORDER, 4)
    # one stage per class, in send order: images, RTSTRUCT, RTPLAN, RTDOSE
    kinds = [
        {
            object_category(o.modality, o.sop_class_uid)
            for lane in stage
            for objs, _ in lane
            for o in objs
        }
        for stage in stages
    ]
    assert kinds == [{"IMAGES"}, {"RTSTRUCT"}, {"RTPLAN"}, {"RTDOSE"}]
    images = stages[0]
    assert len(images) == 4
    sizes = [sum(len(objs) for objs, _ in lane) for lane in images]
    assert sizes == [3, 3, 2, 2]  # near-equal, the first lanes take the remainder
    # lanes hold consecutive objects, so concatenated they give the send order back
    flat = [o for stage in stages for lane in stage for objs, _ in lane for o in objs]
    assert flat == ordered
    ranks = [category_rank(o, DEFAULT_SEND_ORDER) for o in flat]
    assert ranks == sorted(ranks)
    # never more lanes than objects: one structure set is one association
    assert len(stages[1]) == 1 and len(stages[3]) == 2
    # every association proposes the contexts its objects need
    for stage in stages:
        for lane in stage:
            for objs, contexts in lane:
                offered = {c.sop_class_uid for c in contexts}
                assert {o.sop_class_uid for o in objs} <= offered


@given(
    images=st.integers(min_value=0, max_value=40),
    n=st.integers(min_value=1, max_value=8),
)
def test_plan_stages_sends_every_object_once_in_order(images: int, n: int) -> None:
    from dicomnode.forwarder.batching import plan_stages

    ordered = _group(images)
    stages = plan_stages(ordered, DEFAULT_SEND_ORDER, n)
    flat = [o for stage in stages for lane in stage for objs, _ in lane for o in objs]
    assert flat == ordered
    assert all(1 <= len(stage) <= n for stage in stages)

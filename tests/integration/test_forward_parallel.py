"""Parallel associations (``max_associations``) against real peers on 127.0.0.1.

DCMTK ``storescp --fork`` serves each association in a process of its own; its
``--exec-on-reception`` hook appends ``<file name> <pid of that process>`` per
object, so the log shows which association carried each object and in which
order the objects arrived. Interleaved lines of different associations prove
they were open at the same time; the position of the RT objects proves the
class barrier (no RTSTRUCT before every image was answered, and so on).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from dicomnode.forwarder import Forwarder, send_paths
from tests.conftest import free_port, wait_until
from tests.factories import make_image, rt_set, save
from tests.integration.test_forward import (
    StoreSCP,
    error_log,
    fconfig,
    files_in,
    start_forwarder,
)
from tests.integration.test_forward_refusals import RefusingSCP

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning"),
]


class ForkingStoreSCP(StoreSCP):
    """DCMTK storescp, one process per association, logging ``<file> <association pid>``."""

    leading_args = ("--fork",)

    def reception_note(self) -> str:
        # the hook's shell is a child of the process serving the association
        return f'echo "#f $PPID" >> {self.order_file}'

    def arrivals(self) -> list[tuple[str, str]]:
        """Return ``(file name, association pid)`` in arrival order."""
        if not self.order_file.exists():
            return []
        lines = self.order_file.read_text().splitlines()
        return [(ln.split()[0], ln.split()[1]) for ln in lines if len(ln.split()) == 2]


@pytest.fixture
def forking_storescp(tmp_path: Path) -> Iterator[ForkingStoreSCP]:
    scp = ForkingStoreSCP(tmp_path).start()
    yield scp
    scp.stop()


def most_at_once(arrivals: list[tuple[str, str]]) -> int:
    """Return the most associations whose first-to-last arrival spans overlap at one point."""
    spans: dict[str, list[int]] = {}
    for index, (_name, pid) in enumerate(arrivals):
        spans.setdefault(pid, [index, index])[1] = index
    return max(
        sum(1 for first, last in spans.values() if first <= i <= last) for i in range(len(arrivals))
    )


def write_group(folder: Path, images: int) -> tuple[list[str], dict[str, str]]:
    """Write ``images`` CTs and an RT set; return CT UIDs and {kind: UID} of the RT objects."""
    study = "1.2.826.0.1.3680043.8.498.4242"
    cts = [make_image("CT", study_uid=study, instance=i + 1) for i in range(images)]
    for i, ct in enumerate(cts):
        save(ct, folder / f"ct_{i:03d}.dcm")
    rt = rt_set(study_uid=study)
    # names that sort before the images: the order comes from the headers
    save(rt["rtdose"], folder / "a_dose.dcm")
    save(rt["rtplan"], folder / "b_plan.dcm")
    save(rt["rtstruct"], folder / "c_struct.dcm")
    kinds = {k: str(rt[n].SOPInstanceUID) for k, n in (("RS", "rtstruct"), ("RP", "rtplan"))}
    kinds["RD"] = str(rt["rtdose"].SOPInstanceUID)
    return [str(ct.SOPInstanceUID) for ct in cts], kinds


def test_images_go_over_n_associations_at_once_and_rt_waits_for_all_of_them(
    tmp_path: Path, forking_storescp: ForkingStoreSCP, forwarders: list[Forwarder]
) -> None:
    cfg = fconfig(tmp_path, forking_storescp.port, max_associations=4)
    images, rt = write_group(cfg.watch_folder / "PAT1", 80)
    start_forwarder(forwarders, cfg)
    total = len(images) + 3
    assert wait_until(lambda: len(forking_storescp.arrivals()) == total, 60), (
        forking_storescp.arrivals()
    )
    assert wait_until(lambda: not (cfg.watch_folder / "PAT1").exists(), 20)
    arrivals = forking_storescp.arrivals()
    names = [name for name, _ in arrivals]
    # every image before the structure set, then plan, then dose (one association each)
    assert [n.split(".")[0] for n in names] == ["CT"] * len(images) + ["RS", "RP", "RD"]
    assert {n.split(".", 1)[1] for n in names[: len(images)]} == set(images)
    assert [n.split(".", 1)[1] for n in names[len(images) :]] == [rt["RS"], rt["RP"], rt["RD"]]
    # the images came over 4 associations, all 4 open at the same time
    image_arrivals = arrivals[: len(images)]
    assert len({pid for _, pid in image_arrivals}) == 4
    assert most_at_once(image_arrivals) == 4, image_arrivals
    # and each RT object over an association of its own, after the image associations
    assert len({pid for _, pid in arrivals}) == 4 + 3
    assert not cfg.failed_dir.exists() or not files_in(cfg.failed_dir)


def test_one_association_is_still_one_association(
    tmp_path: Path, forking_storescp: ForkingStoreSCP
) -> None:
    cfg = fconfig(tmp_path, forking_storescp.port)  # max_associations = 1 (the default)
    images, _rt = write_group(tmp_path / "in" / "PAT2", 12)
    assert send_paths([tmp_path / "in" / "PAT2"], cfg, progress=False) == 0
    arrivals = forking_storescp.arrivals()
    assert len(arrivals) == len(images) + 3
    assert len({pid for _, pid in arrivals}) == 1


def test_refused_image_is_parked_before_rt_follows_with_several_associations(
    tmp_path: Path, forwarders: list[Forwarder], caplog: pytest.LogCaptureFixture
) -> None:
    """Per-file outcomes with N > 1: a transiently refused image is counted, parked, RT waits."""
    caplog.set_level("INFO", logger="dicomnode")
    cfg = fconfig(tmp_path, 0, max_object_refusals=3, max_associations=3)
    group = cfg.watch_folder / "PAT"
    study = "1.2.826.0.1.3680043.8.498.1213"
    cts = [make_image("CT", study_uid=study, instance=i + 1) for i in range(6)]
    for i, ct in enumerate(cts):
        save(ct, group / ("refused.dcm" if i == 2 else f"ct{i}.dcm"))
    rt = rt_set(study_uid=study)
    for name in ("rtstruct", "rtplan", "rtdose"):
        save(rt[name], group / f"{name}.dcm")
    scp = RefusingSCP(str(cts[2].SOPInstanceUID), 0xA701, cfg.failed_dir).start()
    try:
        cfg = replace(cfg, target_port=scp.port)
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not group.exists(), 60), caplog.text
    finally:
        scp.stop()
    assert scp.refusals == 3  # max_object_refusals
    got = [uid for uid, _ in scp.received]
    rt_uids = [str(rt[n].SOPInstanceUID) for n in ("rtstruct", "rtplan", "rtdose")]
    others = {str(ct.SOPInstanceUID) for i, ct in enumerate(cts) if i != 2}
    assert set(got[:5]) == others and got[5:] == rt_uids
    # clinical order: no RT object before the refused image was parked
    assert [parked for uid, parked in scp.received if uid in rt_uids] == [True, True, True]
    log = error_log(cfg)
    assert len(log.splitlines()) == 1 and "refused.dcm" in log
    assert "status=0xA701" in log and "refused 3 time(s)" in log


def test_target_down_keeps_every_file_then_all_are_delivered(tmp_path: Path) -> None:
    port = free_port()
    cfg = fconfig(tmp_path, port, max_associations=3)
    images, _rt = write_group(tmp_path / "in" / "PAT3", 9)
    folder = tmp_path / "in" / "PAT3"
    assert send_paths([folder], cfg, progress=False) == 1
    assert len(files_in(folder)) == len(images) + 3  # nothing deleted, nothing parked
    assert not cfg.failed_dir.exists()
    scp = ForkingStoreSCP(tmp_path, port).start()
    try:
        assert send_paths([folder], cfg, progress=False) == 0
        assert len(scp.arrivals()) == len(images) + 3
    finally:
        scp.stop()
    assert files_in(folder) == []  # delivered and deleted (the argument folder stays)

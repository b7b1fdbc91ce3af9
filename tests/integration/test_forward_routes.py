"""Destinations and routes against real peers: several DCMTK storescp on 127.0.0.1.

Routing by modality / SOP class / calling AE, one destination down while the
other gets everything, one destination refusing a SOP class (its copy parked
under failed/<destination>/), duplicates skipped, ``echo --destination``, and a
kill -9 of the node in the middle of a two-destination send.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode import config
from dicomnode.config import ForwarderConfig
from dicomnode.forwarder import Forwarder
from dicomnode.forwarder.state import STATE_DIR_NAME
from tests.conftest import free_port, wait_until, write_config
from tests.factories import make_image, rt_set, save
from tests.integration.test_forward import TARGET_AET, StoreSCP, files_in

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning"),
]

#: storescp negotiation profile that accepts CT images only (RT plans are refused).
CT_ONLY_PROFILE = """
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit
[[PresentationContexts]]
[ImagesOnly]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
[[Profiles]]
[Default]
PresentationContexts = ImagesOnly
"""


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[dict[str, StoreSCP]]:
    started: dict[str, StoreSCP] = {}
    yield started
    for scp in started.values():
        scp.stop()


def peer(peers: dict[str, StoreSCP], tmp_path: Path, name: str, start: bool = True) -> StoreSCP:
    scp = StoreSCP(tmp_path / f"peer-{name}")
    peers[name] = scp
    return scp.start() if start else scp


def ini_text(
    watch: Path, ports: dict[str, int], routes: str, default_port: int | None = None
) -> str:
    text = "[Security]\ntrusted_ae_titles = *\n[FolderWatcher]\n"
    text += f"watch_folder = {watch}\ncalling_aet = FWDTEST\n"
    if default_port is not None:
        text += f"target_aet = {TARGET_AET}\ntarget_ip = 127.0.0.1\ntarget_port = {default_port}\n"
    for name, port in ports.items():
        text += f"[Destination:{name}]\nae_title = DEST_{name}\nhost = 127.0.0.1\nport = {port}\n"
    return text + routes


def fast(fw: ForwarderConfig, **kw: object) -> ForwarderConfig:
    """Return ``fw`` with test-speed timers and limits, then ``kw``."""
    quick = replace(
        fw,
        max_workers=2,
        heartbeat_interval=1.0,
        process_timer_interval=0.2,
        inactivity_timeout=0.5,
        retry_initial_delay_s=0.2,
        retry_max_delay_s=0.5,
        give_up_after_s=3600.0,
        acse_timeout_s=5.0,
        dimse_timeout_s=10.0,
        network_timeout_s=10.0,
        rt_completeness_wait_s=0.0,  # these groups hold plans without their structure sets
    )
    return replace(quick, **kw)  # type: ignore[arg-type]


def routed_config(
    tmp_path: Path, ports: dict[str, int], routes: str, **kw: object
) -> ForwarderConfig:
    text = ini_text(tmp_path / "watch", ports, routes)
    return fast(config.parse(text, "test.ini", tmp_path).forwarder, **kw)


def start(forwarders: list[Forwarder], cfg: ForwarderConfig) -> Forwarder:
    cfg.watch_folder.mkdir(parents=True, exist_ok=True)
    fw = Forwarder(cfg)
    forwarders.append(fw)
    fw.start()
    return fw


def pending(watch: Path) -> list[Path]:
    """Files still waiting in the watch folder (not failed/, not the forwarder's state)."""
    return [p for p in files_in(watch) if "failed" not in p.relative_to(watch).parts]


def write_cts(folder: Path, n: int, patient: str = "PAT1") -> dict[str, Dataset]:
    study = "1.2.826.0.1.3680043.8.498.77"
    found = {}
    for i in range(n):
        ds = make_image("CT", instance=i + 1, patient_id=patient, study_uid=study)
        save(ds, folder / f"ct{i:03d}.dcm")
        found[str(ds.SOPInstanceUID)] = ds
    return found


# --------------------------------------------------------------------------- routing


def test_routes_by_modality_sop_class_and_calling_ae_unmatched_parked(
    tmp_path: Path, peers: dict[str, StoreSCP], forwarders: list[Forwarder]
) -> None:
    a, b = peer(peers, tmp_path, "A"), peer(peers, tmp_path, "B")
    routes = (
        "[Route:plans]\ndestinations = B\nmodality = RTPLAN\n"
        "[Route:ct]\ndestinations = A\nsop_class = CTImageStorage\n"
        "[Route:from-tps]\ndestinations = A, B\ncalling_ae = TPS\n"
    )
    cfg = routed_config(tmp_path, {"A": a.port, "B": b.port}, routes, unrouted="park")
    group = cfg.watch_folder / "PAT1"
    ct = make_image("CT", instance=1)
    mr = make_image("MR", instance=2)
    mr.file_meta.SourceApplicationEntityTitle = "TPS"
    rt = rt_set()
    save(ct, group / "ct.dcm")
    save(mr, group / "mr.dcm")
    save(rt["rtplan"], group / "plan.dcm")
    save(rt["rtdose"], group / "dose.dcm")  # matches no route: parked
    start(forwarders, cfg)
    assert wait_until(lambda: not pending(cfg.watch_folder), 60), pending(cfg.watch_folder)
    assert wait_until(lambda: len(a.order()) == 2 and len(b.order()) == 2, 30)
    assert sorted(a.received_sops()) == sorted([ct.SOPInstanceUID, mr.SOPInstanceUID])
    assert sorted(b.received_sops()) == sorted([mr.SOPInstanceUID, rt["rtplan"].SOPInstanceUID])
    log = (cfg.failed_dir / "send_errors.log").read_text()
    assert "no route matches (modality=RTDOSE" in log and "unrouted = park" in log
    parked = [p.name for p in files_in(cfg.failed_dir) if p.suffix == ".dcm"]
    assert parked == ["dose.dcm"]


# --------------------------------------------------------------------------- independence


def test_one_destination_down_the_other_gets_everything_then_the_first_catches_up(
    tmp_path: Path,
    peers: dict[str, StoreSCP],
    forwarders: list[Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode")
    a = peer(peers, tmp_path, "A")
    b = peer(peers, tmp_path, "B", start=False)  # its port is not listening yet
    cfg = routed_config(tmp_path, {"A": a.port, "B": b.port}, "[Route:all]\ndestinations = A, B\n")
    sent = write_cts(cfg.watch_folder / "PAT1", 12)
    started = time.monotonic()
    start(forwarders, cfg)
    assert wait_until(lambda: len(a.order()) == 12, 60), a.order()
    took_s = time.monotonic() - started
    assert sorted(a.received_sops()) == sorted(sent)
    # B's share waits in the watch folder (nothing deleted while B has not acknowledged)
    assert len(pending(cfg.watch_folder)) == 12
    status = forwarders[0].status()["destinations"]
    assert wait_until(lambda: forwarders[0].status()["destinations"]["B"]["retry"], 20)  # type: ignore[index]
    assert not status["A"]["retry"] and status["A"]["awaiting_files"] == 0  # type: ignore[index]
    assert wait_until(lambda: "A:awaiting=0/sending=0/retrying=0,B:awaiting=12" in caplog.text, 20)
    b.start()
    assert wait_until(lambda: not pending(cfg.watch_folder), 60), pending(cfg.watch_folder)
    assert wait_until(lambda: len(b.order()) == 12, 30)
    assert sorted(b.received_sops()) == sorted(sent)
    assert len(a.order()) == 12, "A must not get its objects again"
    assert took_s < 45


def test_destination_refusing_a_sop_class_gets_its_copy_parked_others_delivered(
    tmp_path: Path, peers: dict[str, StoreSCP], forwarders: list[Forwarder]
) -> None:
    a = peer(peers, tmp_path, "A")
    b = peer(peers, tmp_path, "B", start=False)
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(CT_ONLY_PROFILE)
    b.extra_args = ["--config-file", str(profile), "Default"]
    b.start()
    cfg = routed_config(tmp_path, {"A": a.port, "B": b.port}, "[Route:all]\ndestinations = A, B\n")
    group = cfg.watch_folder / "PAT2"
    cts = write_cts(group, 2, patient="PAT2")
    plan = rt_set("PAT2")["rtplan"]
    save(plan, group / "plan.dcm")
    start(forwarders, cfg)
    assert wait_until(lambda: not pending(cfg.watch_folder), 60), pending(cfg.watch_folder)
    assert wait_until(lambda: len(a.order()) == 3 and len(b.order()) == 2, 30)
    assert sorted(a.received_sops()) == sorted([*cts, plan.SOPInstanceUID])
    assert sorted(b.received_sops()) == sorted(cts)
    parked = [p for p in files_in(cfg.failed_dir) if p.suffix == ".dcm"]
    assert len(parked) == 1 and parked[0].name == "plan.dcm"
    assert parked[0].relative_to(cfg.failed_dir).parts[0] == "B"
    assert dcmread(parked[0]).SOPInstanceUID == plan.SOPInstanceUID
    (line,) = (cfg.failed_dir / "send_errors.log").read_text().splitlines()
    assert "destination=B" in line and plan.SOPInstanceUID in line


# --------------------------------------------------------------------------- duplicates


def test_identical_objects_dropped_again_are_skipped_changed_ones_sent(
    tmp_path: Path,
    peers: dict[str, StoreSCP],
    forwarders: list[Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = peer(peers, tmp_path, "A"), peer(peers, tmp_path, "B")
    cfg = routed_config(tmp_path, {"A": a.port, "B": b.port}, "[Route:all]\ndestinations = A, B\n")
    group = cfg.watch_folder / "PAT3"
    sent = write_cts(group, 3, patient="PAT3")
    copies = {p.name: p.read_bytes() for p in group.iterdir()}
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        start(forwarders, cfg)
        assert wait_until(lambda: not pending(cfg.watch_folder), 60)
        # storescp notes a reception (--exec-on-reception) around its response: wait for it
        assert wait_until(lambda: len(a.order()) == 3 and len(b.order()) == 3, 30)
        for name, data in copies.items():  # the same export again
            (group / name).parent.mkdir(parents=True, exist_ok=True)
            (group / name).write_bytes(data)
        assert wait_until(lambda: not pending(cfg.watch_folder), 60)
        assert caplog.text.count("SKIPPED-DUPLICATE") == 6, caplog.text
        assert len(a.order()) == 3 and len(b.order()) == 3
        # the same SOP Instance UID with other content is a new object
        first = sorted(sent)[0]
        changed = sent[first]
        changed.SeriesDescription = "corrected"
        save(changed, group / "fixed.dcm")
        assert wait_until(lambda: len(a.order()) == 4 and len(b.order()) == 4, 60)
        assert wait_until(lambda: not pending(cfg.watch_folder), 30)
    assert caplog.text.count("SKIPPED-DUPLICATE") == 6


def test_single_target_skips_duplicates_too_and_window_zero_turns_it_off(
    tmp_path: Path, peers: dict[str, StoreSCP], forwarders: list[Forwarder]
) -> None:
    a = peer(peers, tmp_path, "A")
    text = ini_text(tmp_path / "watch", {}, "", default_port=a.port)
    base = config.parse(text, "t.ini", tmp_path).forwarder
    cfg = fast(base, duplicate_window_s=0)
    group = cfg.watch_folder / "PAT4"
    write_cts(group, 2, patient="PAT4")
    copies = {p.name: p.read_bytes() for p in group.iterdir()}
    start(forwarders, cfg)
    assert wait_until(lambda: len(a.order()) == 2 and not pending(cfg.watch_folder), 60)
    for name, data in copies.items():
        group.mkdir(parents=True, exist_ok=True)
        (group / name).write_bytes(data)
    assert wait_until(lambda: len(a.order()) == 4 and not pending(cfg.watch_folder), 60)


# --------------------------------------------------------------------------- CLI and kill -9


def node_ini(tmp_path: Path, ports: dict[str, int], routes: str) -> Path:
    watch = tmp_path / "watch"
    sections: dict[str, dict[str, object]] = {
        "General": {"ae_title": "FWDTEST"},
        "Network": {"receive_port": free_port(), "server_ip": "127.0.0.1"},
        "Directories": {"destination_dir": tmp_path / "received"},
        "Security": {"trusted_ae_titles": "*"},
        "FolderWatcher": {
            "watch_folder": watch,
            "inactivity_timeout": 0.5,
            "process_timer_interval": 0.5,
            "retry_initial_delay_s": 0.5,
            "retry_max_delay_s": 1,
        },
        "Ledger": {"enabled": "false"},
        "Web": {"enabled": "false"},
    }
    for name, port in ports.items():
        sections[f"Destination:{name}"] = {
            "ae_title": f"DEST_{name}",
            "host": "127.0.0.1",
            "port": port,
        }
    path = write_config(tmp_path / "node.ini", sections)
    path.write_text(path.read_text() + routes)
    return path


def test_echo_destination_and_check_config_list_destinations(
    tmp_path: Path,
    peers: dict[str, StoreSCP],
    start_node,  # type: ignore[no-untyped-def]
) -> None:
    a = peer(peers, tmp_path, "A")
    ini = node_ini(tmp_path, {"A": a.port, "DOWN": free_port()}, "[Route:all]\ndestinations = A\n")
    ok = start_node(["--config", str(ini), "echo", "--destination", "A"])
    assert ok.proc.wait(60) == 0, ok.output()
    assert "ECHO-OK" in ok.output() and "destination A" in ok.output()
    down = start_node(["--config", str(ini), "echo", "--destination", "DOWN", "--timeout", "3"])
    assert down.proc.wait(60) == 1, down.output()
    unknown = start_node(["--config", str(ini), "echo", "--destination", "NOPE"])
    assert unknown.proc.wait(60) == 2 and "configured: A, DOWN" in unknown.output()
    check = start_node(["--config", str(ini), "check-config"])
    assert check.proc.wait(60) == 0
    assert "# forwarder destination A: DEST_A@127.0.0.1" in check.output()
    assert "DOWN" in check.output() and "(no route sends to it)" in check.output()
    image = make_image("CT", instance=9)
    one = save(image, tmp_path / "one" / "ct.dcm")
    sent = start_node(["--config", str(ini), "send", "--destination", "A", str(one.parent)])
    assert sent.proc.wait(60) == 0, sent.output()
    assert a.received_sops() == [image.SOPInstanceUID]
    assert not one.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9")
def test_kill_9_mid_send_to_two_destinations_loses_nothing_resends_at_most_in_flight(
    tmp_path: Path,
    peers: dict[str, StoreSCP],
    start_node,  # type: ignore[no-untyped-def]
) -> None:
    a, b = peer(peers, tmp_path, "A"), peer(peers, tmp_path, "B")
    ini = node_ini(tmp_path, {"A": a.port, "B": b.port}, "[Route:all]\ndestinations = A, B\n")
    watch = tmp_path / "watch"
    n = 80
    sent = write_cts(watch / "PAT5", n, patient="PAT5")
    node = start_node(["--config", str(ini), "--no-receiver"])
    assert wait_until(lambda: len(a.order()) >= 15 or len(b.order()) >= 15, 120), node.output()
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(30)
    before = (len(a.order()), len(b.order()))
    assert before[0] < n or before[1] < n, "the kill came too late to test anything"
    again = start_node(["--config", str(ini), "--no-receiver"])
    assert wait_until(lambda: not pending(watch), 180), again.output()
    assert wait_until(lambda: len(set(a.order())) == n and len(set(b.order())) == n, 30)
    for scp in (a, b):
        assert sorted(set(scp.received_sops())) == sorted(sent)  # nothing lost
        assert len(scp.order()) <= n + 1, (
            f"resent more than the object in flight: {len(scp.order())}"
        )
    assert not (watch / "failed").exists()
    assert (watch / STATE_DIR_NAME / "deliveries.sqlite").exists()


def test_console_and_metrics_show_state_per_destination(
    tmp_path: Path,
    peers: dict[str, StoreSCP],
    start_node,  # type: ignore[no-untyped-def]
) -> None:
    from tests.integration.test_console import get, metrics

    a = peer(peers, tmp_path, "A")
    b = peer(peers, tmp_path, "B", start=False)
    ini = node_ini(tmp_path, {"A": a.port, "B": b.port}, "[Route:all]\ndestinations = A, B\n")
    web_port = free_port()
    text = ini.read_text()
    text = text.replace("[Ledger]\nenabled = false", "[Ledger]\nenabled = true")
    text = text.replace("[Web]\nenabled = false", f"[Web]\nenabled = true\nport = {web_port}")
    ini.write_text(text)
    watch = tmp_path / "watch"
    group = watch / "PAT6"
    write_cts(group, 4, patient="PAT6")
    copies = {p.name: p.read_bytes() for p in group.iterdir()}
    start_node(["--config", str(ini), "--no-receiver"], port=web_port)
    where_a, where_b = f"DEST_A@127.0.0.1:{a.port}", f"DEST_B@127.0.0.1:{b.port}"
    awaiting_b = ("dicomnode_forward_awaiting_files", (("destination", where_b),))
    awaiting_a = ("dicomnode_forward_awaiting_files", (("destination", where_a),))
    backing_b = ("dicomnode_forward_backing_off_groups", (("destination", where_b),))
    assert wait_until(lambda: len(a.order()) == 4, 60)
    assert wait_until(
        lambda: metrics(web_port).get(awaiting_b) == 4 and metrics(web_port).get(backing_b) == 1,
        60,
    ), metrics(web_port)
    assert metrics(web_port).get(awaiting_a) == 0
    status, page = get(f"http://127.0.0.1:{web_port}/queue")
    assert status == 200 and 'id="destinations"' in page and where_b in page
    b.start()
    assert wait_until(lambda: not pending(watch), 60)
    for name, data in copies.items():
        group.mkdir(parents=True, exist_ok=True)
        (group / name).write_bytes(data)
    skipped_a = ("dicomnode_skipped_duplicates_total", (("destination", where_a),))
    skipped_b = ("dicomnode_skipped_duplicates_total", (("destination", where_b),))
    assert wait_until(
        lambda: metrics(web_port).get(skipped_a) == 4 and metrics(web_port).get(skipped_b) == 4,
        60,
    ), metrics(web_port)
    assert len(a.order()) == 4 and len(b.order()) == 4


def test_rt_completeness_is_checked_per_destination_share(
    tmp_path: Path,
    peers: dict[str, StoreSCP],
    forwarders: list[Forwarder],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A waits for the structure set; B (its own wait 0 = off) gets plan and dose at once."""
    caplog.set_level(logging.INFO, logger="dicomnode")
    a, b = peer(peers, tmp_path, "A"), peer(peers, tmp_path, "B")
    text = ini_text(tmp_path / "watch", {"A": a.port, "B": b.port}, "")
    text = text.replace(f"port = {b.port}\n", f"port = {b.port}\nrt_completeness_wait_s = 0\n")
    text += "[Route:rt]\ndestinations = A, B\n"
    base = config.parse(text, "t.ini", tmp_path).forwarder
    cfg = fast(base, rt_completeness_wait_s=120.0)
    rt = rt_set("PAT7")
    group = cfg.watch_folder / "PAT7"
    save(rt["rtplan"], group / "plan.dcm")
    save(rt["rtdose"], group / "dose.dcm")
    fw = start(forwarders, cfg)
    assert wait_until(lambda: len(b.order()) == 2, 60), caplog.text
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("WAITING")]
    assert len(waiting) == 1 and "destination=A" in waiting[0], waiting
    assert "PAT7" in fw.status()["waiting"]  # type: ignore[operator]
    assert not a.order() and len(pending(cfg.watch_folder)) == 2  # kept for A
    save(rt["rtstruct"], group / "struct.dcm")
    assert wait_until(lambda: len(a.order()) == 3, 60), caplog.text
    assert a.received_sops() == [
        rt["rtstruct"].SOPInstanceUID,
        rt["rtplan"].SOPInstanceUID,
        rt["rtdose"].SOPInstanceUID,
    ]
    assert wait_until(lambda: len(b.order()) == 3 and not pending(cfg.watch_folder), 60)
    assert sorted(b.received_sops()[:2]) == sorted(
        [rt["rtplan"].SOPInstanceUID, rt["rtdose"].SOPInstanceUID]
    )

"""Fault injection: kill -9 the node again and again mid-transfer; freeze the forwarder's target.

The contract under test (DESIGN.md, "Contracts"): an object the sender saw
acknowledged is complete on disk, byte for byte, even if the process dies the
next instant; nothing half-written is ever visible under a final name; a
restart resumes service. The node (and its worker processes, if any) is killed
with SIGKILL at random moments of a transfer of hundreds of objects; after each
kill, before restarting, every acknowledged object is checked on disk.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomnode.integrity import find_defect
from tests.conftest import (
    end_process,
    files_below,
    free_port,
    peer_env,
    require_tool,
    wait_for_port,
    wait_until,
    write_config,
)
from tests.factories import ROOT, make_image, save
from tests.integration.rawpeer import (
    acknowledged_by_storescu,
    assert_nothing_half_written,
    dataset_bytes,
    visible_files,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

OBJECTS = 300
KILLS = 5


def _children(pid: int) -> list[int]:
    """Return the PIDs of every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_hard(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (a power cut, as far as they know)."""
    for target in [pid, *_children(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            continue


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _stored_by_uid(dest: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in visible_files(dest):
        if path.relative_to(dest).parts[0] == "errors" or path.suffix != ".dcm":
            continue
        out.setdefault(path.stem.split("_", 1)[1], []).append(path)
    return out


@pytest.mark.timeout(150)
def test_faults_kill9_during_storescu_loses_nothing_acknowledged(
    tmp_path: Path, port: int, start_node: Callable[..., Any]
) -> None:
    storescu = require_tool("storescu")
    seed = int(os.environ.get("FAULT_SEED", str(time.time_ns() % 1_000_000)))
    rng = random.Random(seed)
    dest = tmp_path / "dest"
    cfg = write_config(
        tmp_path / "node.ini",
        {
            "General": {"ae_title": "NODE"},
            "Network": {"server_ip": "127.0.0.1", "receive_port": port},
            "Directories": {"destination_dir": dest, "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "SENDER"},
            "Tools": {"enhanced_mr_conversion": "off"},
        },
    )
    study = generate_uid(ROOT)
    series = generate_uid(ROOT)
    files: list[Path] = []
    expected: dict[str, bytes] = {}
    for i in range(OBJECTS):
        ds = make_image(study_uid=study, series_uid=series, instance=i, rows=32, cols=32)
        path = save(ds, tmp_path / "send" / f"{i:04d}.dcm")
        files.append(path)
        expected[str(ds.SOPInstanceUID)] = dataset_bytes(path)
    uid_of = {path: uid for path, uid in zip(files, expected, strict=True)}

    acked: set[Path] = set()
    kills = 0
    for cycle in range(KILLS + 1):
        assert wait_until(lambda: _port_free(port), 20), "old node still holds the port"
        node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
        assert wait_until(lambda n=node: "READY" in n.output(), 20), node.output()
        pending = [f for f in files if f not in acked]
        if not pending:
            break
        log_path = tmp_path / f"storescu-{cycle}.log"
        with log_path.open("w") as log:
            sender = subprocess.Popen(
                [storescu, "-v", "-aet", "SENDER", "-aec", "NODE", "127.0.0.1", str(port)]
                + [str(f) for f in pending],
                env=peer_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            if cycle < KILLS:
                # Kill somewhere inside the transfer: after a random number of acks.
                target = rng.randint(1, max(1, len(pending) // 3))
                wait_until(
                    lambda t=target, lp=log_path, sp=sender: (
                        lp.read_text().count("Received Store Response") >= t
                        or sp.poll() is not None
                    ),
                    30,
                    interval_s=0.002,
                )
                # A random phase within the next few objects (~1 ms each): a longer pause
                # could let the whole remainder through before the last kill.
                time.sleep(rng.uniform(0, 0.005))
                _kill_hard(node.proc.pid)
                kills += 1
            sender.wait(60)
        new = acknowledged_by_storescu(log_path.read_text(), pending)
        acked |= new

        # Before any restart: every acknowledged object is complete and unaltered.
        stored = _stored_by_uid(dest)
        for path in acked:
            uid = uid_of[path]
            assert uid in stored, f"seed {seed}: acknowledged {path.name} lost after kill {kills}"
            assert len(stored[uid]) == 1, f"seed {seed}: {uid} stored twice: {stored[uid]}"
            assert dataset_bytes(stored[uid][0]) == expected[uid], f"seed {seed}: {uid} altered"
        assert_nothing_half_written(dest)
        for uid, paths in stored.items():
            assert uid in expected, f"seed {seed}: unexpected object {paths}"
            assert dataset_bytes(paths[0]) == expected[uid], f"seed {seed}: {paths[0]} corrupt"
        if cycle < KILLS:
            node.stop()  # already dead; closes the log handle
        else:
            assert sender.returncode == 0, log_path.read_text()[-2000:]
            node.stop()

    assert kills == KILLS
    assert acked == set(files), f"seed {seed}: {len(files) - len(acked)} never acknowledged"
    stored = _stored_by_uid(dest)
    assert sorted(stored) == sorted(expected)
    assert all(len(paths) == 1 for paths in stored.values())
    assert_nothing_half_written(dest)
    assert not (dest / "errors").exists() or not any((dest / "errors").iterdir())


# --------------------------------------------------------------------------- forwarder


class Target:
    """DCMTK storescp as the forwarder's target, writing into ``out``."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.out = tmp / "target-out"
        self.out.mkdir(parents=True)
        self._log = (tmp / "storescp.log").open("wb")
        self.proc = subprocess.Popen(
            [require_tool("storescp"), "-aet", "TARGET", "-od", str(self.out), str(self.port)],
            env=peer_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port, proc=self.proc)

    def received(self) -> dict[str, Path]:
        """Return SOP Instance UID -> file of every object the target has written."""
        out: dict[str, Path] = {}
        for path in self.out.iterdir():
            uid = path.name.split(".", 1)[1] if "." in path.name else path.name
            out[uid.removesuffix(".dcm")] = path
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process does not act on SIGTERM
        end_process(self.proc, 10)
        self._log.close()


def _forwarder_config(tmp_path: Path, watch: Path, target: Target, **extra: object) -> Path:
    folder_watcher: dict[str, object] = {
        "watch_folder": watch,
        "target_aet": "TARGET",
        "target_ip": "127.0.0.1",
        "target_port": target.port,
        "inactivity_timeout": 0.3,
        "process_timer_interval": 0.2,
        "retry_initial_delay_s": 0.3,
        "retry_max_delay_s": 0.6,
        "dimse_timeout_s": 3,
        "network_timeout_s": 3,
        "acse_timeout_s": 3,
    }
    folder_watcher.update(extra)
    return write_config(
        tmp_path / "forwarder.ini",
        {
            "Network": {"receive_port": free_port()},
            "Directories": {"destination_dir": tmp_path / "received", "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "SENDER"},
            "FolderWatcher": folder_watcher,
        },
    )


def _make_watch_folder(
    tmp_path: Path, groups: int, per_group: int
) -> tuple[Path, dict[str, bytes]]:
    watch = tmp_path / "watch"
    expected: dict[str, bytes] = {}
    uid_of: dict[str, str] = {}
    for g in range(groups):
        study = generate_uid(ROOT)
        for i in range(per_group):
            ds = make_image(patient_id=f"P{g}", study_uid=study, instance=i, rows=32, cols=32)
            path = save(ds, tmp_path / "staging" / f"G{g}" / f"{i:03d}.dcm")
            expected[str(ds.SOPInstanceUID)] = dataset_bytes(path)
            uid_of[f"G{g}/{path.name}"] = str(ds.SOPInstanceUID)
    # Appear in the watch folder by rename, as a well-behaved producer does.
    (tmp_path / "staging").rename(watch)
    return watch, expected, uid_of


def _watch_files(watch: Path) -> dict[str, Path]:
    """Return group/file name -> path of the objects still waiting in the watch folder."""
    return {
        path.parent.name + "/" + path.name: path
        for path in files_below(watch)
        if path.parent.parent == watch
        and path.parent.name.startswith("G")
        and path.suffix == ".dcm"
    }


def _assert_delivery_invariant(
    watch: Path, target: Target, expected: dict[str, bytes], uid_of: dict[str, str]
) -> None:
    """Every object gone from the watch folder is at the target, whole and unaltered."""
    left = {uid_of[name] for name in _watch_files(watch)}
    received = target.received()
    for uid, data in expected.items():
        if uid in left:
            continue  # not acknowledged yet: the target may still be writing it
        assert uid in received, f"{uid} deleted from the watch folder but never delivered"
        assert find_defect(received[uid]) is None, f"corrupt delivery {received[uid]}"
        assert dataset_bytes(received[uid]) == data, f"altered delivery {received[uid]}"
    assert set(received) <= set(expected)


@pytest.mark.timeout(150)
def test_faults_kill9_forwarder_repeatedly_delivers_everything_intact(
    tmp_path: Path, start_node: Callable[..., Any]
) -> None:
    rng = random.Random(int(os.environ.get("FAULT_SEED", str(time.time_ns() % 1_000_000))))
    target = Target(tmp_path)
    try:
        watch, expected, uid_of = _make_watch_folder(tmp_path, groups=3, per_group=40)
        cfg = _forwarder_config(tmp_path, watch, target)
        for _kill in range(4):
            node = start_node(["--config", str(cfg), "--no-receiver"])
            before = len(target.received())
            goal = before + rng.randint(3, 25)
            wait_until(lambda g=goal: len(target.received()) >= g, 30, interval_s=0.005)
            _kill_hard(node.proc.pid)
            node.stop()
            _assert_delivery_invariant(watch, target, expected, uid_of)
        node = start_node(["--config", str(cfg), "--no-receiver"])
        assert wait_until(lambda: not _watch_files(watch), 60), node.output()
        _assert_delivery_invariant(watch, target, expected, uid_of)
        assert set(target.received()) == set(expected)
        failed = watch / "failed"
        assert not failed.exists() or not any(failed.rglob("*.dcm")), list(failed.rglob("*"))
        node.stop()
    finally:
        target.stop()


@pytest.mark.timeout(120)
def test_faults_target_frozen_mid_association_then_everything_delivered(
    tmp_path: Path, start_node: Callable[..., Any]
) -> None:
    target = Target(tmp_path)
    try:
        watch, expected, uid_of = _make_watch_folder(tmp_path, groups=1, per_group=60)
        cfg = _forwarder_config(tmp_path, watch, target)
        node = start_node(["--config", str(cfg), "--no-receiver"])
        assert wait_until(lambda: len(target.received()) >= 5, 30, interval_s=0.002)
        target.proc.send_signal(signal.SIGSTOP)  # the target stops answering mid-association
        frozen_at = len(target.received())
        assert wait_until(lambda: "SEND-FAILED" in node.output() or "retry" in node.output(), 20)
        _assert_delivery_invariant(watch, target, expected, uid_of)
        assert len(target.received()) == frozen_at
        assert len(_watch_files(watch)) >= len(expected) - frozen_at - 1
        target.proc.send_signal(signal.SIGCONT)
        assert wait_until(lambda: not _watch_files(watch), 60), node.output()
        _assert_delivery_invariant(watch, target, expected, uid_of)
        assert set(target.received()) == set(expected)
        assert not (watch / "failed").exists() or not any((watch / "failed").rglob("*.dcm"))
        node.stop()
    finally:
        target.stop()

"""Fault injection: kill -9 the receiving node again and again while DCMTK storescu sends.

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

from tests.conftest import peer_env, require_tool, wait_until, write_config
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
                time.sleep(rng.uniform(0, 0.05))
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

"""The order of system calls behind every acknowledged object, watched with strace.

For each object the receiver stored, the trace of the whole node (all processes and
threads, one file, in completion order) must show one of the two durable orders:

* with the receive journal (the default, objects up to 256 KB): its record — one ``pwritev`` to the journal
  file naming its final path and carrying its bytes — then an ``fdatasync`` of the journal started
  after that write and completed, then the ``rename`` to its final name, and only then
  the send of the C-STORE-RSP carrying its SOP Instance UID;
* without it (``journal_mb = 0``, or a larger object): the last write of its temp file, then a flush
  covering it (an ``fsync``/``fdatasync`` of that file, or a ``syncfs`` started after
  that write), then the ``rename`` to its final name, then an ``fsync`` of the final
  folder started after the rename, and only then the send of the C-STORE-RSP.

Several senders at once exercise the group commit, where one thread flushes the
journal records, files and folders of others.
"""

from __future__ import annotations

import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import (
    python_cmd,
    require_tool,
    run_storescu,
    wait_for_port,
    wait_until,
    write_config,
)
from tests.factories import make_image, save

pytestmark = pytest.mark.interop

_SYSCALLS = (
    "write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,syncfs,rename,renameat,renameat2,sendto"
)
_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)$", re.S)
_FD = re.compile(r"^\d+<(.*?)>")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass
class Trace:
    """System calls of interest, indexed by the line on which each completed."""

    last_write: dict[str, int] = field(default_factory=dict)
    flushed: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # path -> (start, end)
    syncfs: list[tuple[int, int]] = field(default_factory=list)
    renamed: dict[str, tuple[str, int]] = field(default_factory=dict)  # final -> (tmp, end)
    sends: list[tuple[int, str]] = field(default_factory=list)  # (start, text)
    # Writes to a receive journal: (end, text, journal path).
    journal_writes: list[tuple[int, str, str]] = field(default_factory=list)


def parse(text: str) -> Trace:
    """Read ``strace -f -y -s N`` output, joining ``unfinished``/``resumed`` halves per thread."""
    trace = Trace()
    started: dict[str, tuple[int, str]] = {}
    for index, raw in enumerate(text.splitlines()):
        match = _LINE.match(raw)
        if match is None:
            continue
        pid, rest = match.groups()
        if rest.endswith("<unfinished ...>"):
            started[pid] = (index, rest[: -len("<unfinished ...>")])
            continue
        start = index
        if rest.startswith("<... "):
            begun = started.pop(pid, None)
            if begun is None:
                continue
            start, head = begun
            rest = head + rest.split("resumed>", 1)[1]
        call = _CALL.match(rest)
        if call is None:
            continue
        name, args = call.groups()
        fd = _FD.match(args)
        path = fd.group(1) if fd else ""
        if name in {"pwrite64", "pwritev", "pwritev2"} and path.endswith("receive.journal"):
            trace.journal_writes.append((index, args, path))
        elif name in {"write", "pwrite64", "writev"} and ".incoming-tmp" in path:
            trace.last_write[path] = index
        elif name in {"fsync", "fdatasync"} and path:
            trace.flushed.setdefault(path, []).append((start, index))
        elif name == "syncfs":
            trace.syncfs.append((start, index))
        elif name.startswith("rename"):
            names = _QUOTED.findall(args)
            if len(names) >= 2 and rest.rstrip().endswith("= 0"):
                trace.renamed[names[1]] = (names[0], index)
        elif name == "sendto" and path.startswith(("socket:", "TCP")):
            trace.sends.append((start, args))
    return trace


def check_object(trace: Trace, final: Path, uid: str) -> str | None:
    """Return what is out of order for one stored object, or None."""
    if str(final) not in trace.renamed:
        return "no rename to its final name"
    tmp, renamed_at = trace.renamed[str(final)]
    written = trace.last_write.get(tmp)
    if written is None:
        return f"no write to its temp file {tmp}"
    file_flushes = [end for start, end in trace.flushed.get(tmp, []) if start > written]
    file_flushes += [end for start, end in trace.syncfs if start > written]
    if not file_flushes or min(file_flushes) > renamed_at:
        return "renamed before a flush of its data completed"
    folder_flushes = [
        end for start, end in trace.flushed.get(str(final.parent), []) if start > renamed_at
    ]
    sends = [start for start, text in trace.sends if uid in text]
    if not sends:
        return "no C-STORE-RSP with its UID was sent"
    first_send = min(sends)
    if first_send < renamed_at:
        return "acknowledged before its rename"
    if not folder_flushes or min(folder_flushes) > first_send:
        return "acknowledged before its folder was flushed after the rename"
    return None


def check_journaled(trace: Trace, final: Path, uid: str) -> str | None:
    """Return what is out of order for one object acknowledged through the journal, or None."""
    if str(final) not in trace.renamed:
        return "no rename to its final name"
    _, renamed_at = trace.renamed[str(final)]
    records = [w for w in trace.journal_writes if str(final) in w[1]]
    if not records:
        return "no journal record naming its final path"
    at, text, journal = records[-1]
    if text.count("iov_base") < 2:
        return "its bytes were not in the record's write"
    flushes = [end for start, end in trace.flushed.get(journal, []) if start > at]
    if not flushes:
        return "no flush of the journal after its record was written"
    sends = [start for start, text in trace.sends if uid in text]
    if not sends:
        return "no C-STORE-RSP with its UID was sent"
    first_send = min(sends)
    if min(flushes) > first_send:
        return "acknowledged before its journal record was flushed"
    if renamed_at > first_send:
        return "acknowledged before its rename"
    return None


@pytest.mark.parametrize("journal_mb", [64, 0], ids=["journal", "fsync-per-object"])
def test_every_acknowledged_object_is_durable_before_its_response(
    tmp_path: Path, port: int, node_env: dict[str, str], journal_mb: int
) -> None:
    strace = require_tool("strace")
    cfg = write_config(
        tmp_path / "c.ini",
        {
            "Network": {"receive_port": port, "receiver_processes": 1},
            "Directories": {
                "destination_dir": tmp_path / "dest",
                "min_free_space_mb": 0,
                "journal_mb": journal_mb,
            },
            "Security": {"trusted_ae_titles": "*"},
            "Tools": {"enhanced_mr_conversion": "off"},
        },
    )
    trace_file = tmp_path / "trace.txt"
    log = (tmp_path / "node.log").open("wb")
    traced = subprocess.Popen(
        [
            *(strace, "-f", "-qq", "-y", "-s", "512", "-e", f"trace={_SYSCALLS}"),
            *("-o", str(trace_file), *python_cmd(), "--config", str(cfg), "--no-watcher"),
        ],
        cwd=tmp_path,
        env=node_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout_s=60, proc=traced)
        # Every fourth object is 512 KB: beyond what the journal takes, it is fsynced
        # as a file, renamed, and its folder fsynced (the second order above).
        groups = [
            [
                save(
                    make_image(
                        "CT",
                        rows=512 if i % 4 == 3 else 16,
                        cols=512 if i % 4 == 3 else 16,
                        patient_id=f"P{g}",
                        instance=i,
                    ),
                    tmp_path / f"in{g}/{i}.dcm",
                )
                for i in range(8)
            ]
            for g in range(3)
        ]
        results: list[subprocess.CompletedProcess[str]] = []
        senders = [
            threading.Thread(
                target=lambda files=files: results.append(
                    run_storescu(port, files, "SCANNER", "DICOMNODE", timeout_s=170)
                )
            )
            for files in groups
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(180)
        assert [r.returncode for r in results] == [0, 0, 0], (
            [r.stderr[-1500:] for r in results],
            (tmp_path / "node.log").read_text(errors="replace")[-3000:],
        )
    finally:
        node = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(traced.pid)], capture_output=True, text=True
        ).stdout.split()
        for pid in node:
            subprocess.run(["kill", "-TERM", pid], check=False)
        traced.wait(60)
        log.close()
    stored = [
        p for p in (tmp_path / "dest" / "incoming").rglob("*.dcm") if ".incoming-tmp" not in p.parts
    ]
    assert len(stored) == 24
    assert wait_until(trace_file.exists, 5)
    trace = parse(trace_file.read_text(errors="replace"))
    problems = {}
    for p in stored:
        # With the journal, objects up to its limit are journaled; larger ones fsynced.
        check = check_journaled if journal_mb and p.stat().st_size <= 256 * 1024 else check_object
        problems[str(p)] = check(trace, p, str(dcmread(p, stop_before_pixels=True).SOPInstanceUID))
    assert {k: v for k, v in problems.items() if v is not None} == {}

"""Profile the dicomnode receiver or sender with py-spy while it moves one dataset.

``receive``: start the node (as ``make bench`` does), attach ``py-spy record
--subprocesses`` to it, send the dataset with DCMTK storescu, and summarise.
``send``: run ``dicomnode send`` of a hard-linked copy under py-spy against
DCMTK storescp. Only on-CPU samples are counted (py-spy's default, no
``--idle``). The summary lists the functions with the most samples on the
stack (inclusive) and at the top of the stack (self), per process kind;
the raw collapsed stacks are kept beside it for flame graphs.

Run ``python bench/pyspy_profile.py receive|send [--dataset small] [--out DIR]``;
needs ``pip install py-spy`` and ptrace rights (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Sibling scripts, found through the sys.path entry above.
import make_data

import bench

TOP: Final = 25


def _without_line(frame: str) -> str:
    """Turn ``func (file.py:123)`` into ``func (file.py)`` so lines of one function add up."""
    name, sep, where = frame.partition(" (")
    return f"{name} ({where.split(':')[0].rstrip(')')})" if sep else frame


def summarise(raw: Path, top: int = TOP) -> list[str]:
    """Return inclusive and self sample counts per function from py-spy's raw output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_without_line(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} on-CPU samples", "", "inclusive (on stack):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "self (top of stack):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return lines


def pyspy() -> str:
    """Return the py-spy executable next to this interpreter or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    found = str(local) if local.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy")
    return found


def profile_receive(data: bench.Dataset, out: Path, tools: bench.Tools, rate: int) -> Path:
    """Profile the node receiving ``data`` from one storescu; return the raw stacks file."""
    work = out / "receive"
    work.mkdir(parents=True, exist_ok=True)
    run_env = dict(bench.os.environ, TCP_NODELAY="1", PYTHONUNBUFFERED="1")
    recv = bench.NodeReceiver(work, run_env, sys.executable)
    recv.start()
    raw = out / "receive.raw.txt"
    try:
        spy = subprocess.Popen(
            [
                pyspy(),
                "record",
                "--pid",
                str(recv.pids()[0]),
                "--subprocesses",
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--threads",
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        time.sleep(1.0)  # let py-spy attach to every process
        cmd = bench.storescu_cmd(tools, recv.port, bench.NODE_AET, [data.folder])
        subprocess.run(cmd, env=run_env, check=False, capture_output=True)
        stored = recv.wait_stored(len(data.files))
        print(f"receive: {stored} of {len(data.files)} stored")
    finally:
        spy.send_signal(bench.signal.SIGINT)
        spy.wait(30)
        recv.stop()
    return raw


def profile_send(data: bench.Dataset, out: Path, tools: bench.Tools, rate: int) -> Path:
    """Profile ``dicomnode send`` of ``data`` to storescp; return the raw stacks file."""
    work = out / "send"
    work.mkdir(parents=True, exist_ok=True)
    run_env = dict(bench.os.environ, TCP_NODELAY="1", PYTHONUNBUFFERED="1")
    recv = bench.DcmtkReceiver(work, run_env, tools)
    recv.start()
    raw = out / "send.raw.txt"
    try:
        opts = bench.parse_args(["--out", str(work)])
        runner = bench.Bench(opts, tools, print)
        cmd = runner.node_send(data)(work, recv)[0]
        # the sender's log goes to a file, as in make bench: a pipe read by this process
        # would make each log line look expensive (the writer waits on the reader)
        with (work / "sender.log").open("wb") as log:
            subprocess.run(
                [
                    pyspy(),
                    "record",
                    "--rate",
                    str(rate),
                    "--format",
                    "raw",
                    "--threads",
                    "--output",
                    str(raw),
                    "--nonblocking",
                    "--",
                    *cmd,
                ],
                env=run_env,
                check=False,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        print(f"send: {recv.wait_stored(len(data.files))} of {len(data.files)} stored")
    finally:
        recv.stop()
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    """Profile one direction and print the summary (also written to <out>/<mode>.summary.txt)."""
    parser = argparse.ArgumentParser(description="py-spy profile of the dicomnode receiver/sender")
    parser.add_argument("mode", choices=["receive", "send"])
    parser.add_argument("--dataset", default="small", choices=list(make_data.FULL_SPECS))
    parser.add_argument("--out", type=Path, default=bench.BENCH_DIR / "out" / "profile")
    parser.add_argument("--rate", type=int, default=200, help="samples per second (200)")
    args = parser.parse_args(argv)
    tools = bench.find_tools()
    if tools is None:
        raise SystemExit("DCMTK storescu/storescp not found")
    folder = make_data.ensure_dataset(
        make_data.FULL_SPECS[args.dataset], make_data.DEFAULT_DATA_DIR
    )
    files = tuple(make_data.dataset_files(folder))
    data = bench.Dataset(args.dataset, folder, files, sum(p.stat().st_size for p in files))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = profile_receive if args.mode == "receive" else profile_send
    raw = run(data, out, tools, args.rate)
    text = "\n".join(summarise(raw)) + "\n"
    (out / f"{args.mode}.summary.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

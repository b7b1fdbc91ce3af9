"""Shared fixtures: free ports, peer discovery (skip locally, fail in CI), node runners."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dicomnode.forwarder import Forwarder

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: Every bounded wait for something to *happen* (wait_until, wait_for_port) lasts up to this
#: many times its nominal timeout. Such waits return as soon as the condition holds, so this
#: costs nothing on a quiet machine and keeps a loaded one (other jobs, a CPU hog) from
#: failing tests by timing alone. ``DICOMNODE_TEST_TIME_FACTOR`` overrides it.
TIME_FACTOR = float(os.environ.get("DICOMNODE_TEST_TIME_FACTOR", "5"))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    """Return the path of an external peer program; skip locally, fail in CI when missing."""
    found = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if found:
        return found
    message = f"{name} not installed (apt-get install dcmtk orthanc dicom3tools)"
    if IN_CI:
        pytest.fail(f"CI=true and required peer missing: {message}")
    pytest.skip(message)


def peer_env() -> dict[str, str]:
    """Environment for DCMTK/Orthanc: TCP_NODELAY=1 or each C-STORE stalls ~40 ms."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def run_storescu(
    port: int,
    files: Sequence[Path],
    aet: str,
    called: str,
    extra: Sequence[str] = (),
    timeout_s: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with DCMTK storescu over one association; return the finished process."""
    return subprocess.run(
        [require_tool("storescu"), *extra, "-aet", aet, "-aec", called, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def wait_for_port(
    port: int, timeout_s: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll until something listens on 127.0.0.1:port (no fixed sleeps; timeout x TIME_FACTOR)."""
    deadline = time.monotonic() + timeout_s * TIME_FACTOR
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"process exited with {proc.returncode} before listening:\n{out}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout_s * TIME_FACTOR} s")


def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it is true or ``timeout_s`` x TIME_FACTOR passes; return its last value.

    For waiting until something happens. To check that something does *not*
    happen within a period use :func:`stays_false` (that period is not stretched).
    """
    deadline = time.monotonic() + timeout_s * TIME_FACTOR
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return bool(value)
        time.sleep(interval_s)


def stays_false(predicate, period_s: float, interval_s: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    """Return True when ``predicate`` stays false for the whole ``period_s`` (not stretched)."""
    deadline = time.monotonic() + period_s
    while time.monotonic() <= deadline:
        if predicate():
            return False
        time.sleep(interval_s)
    return not predicate()


def files_below(folder: Path) -> list[Path]:
    """Return the files below ``folder``, sorted, while the node may be removing folders in it.

    ``os.walk`` rather than ``rglob``: pathlib's glob raises FileNotFoundError
    when a folder it listed is removed (a forwarder prunes emptied folders)
    before it looks inside; ``os.walk`` skips it.
    """
    return sorted(Path(root) / name for root, _dirs, names in os.walk(folder) for name in names)


def python_cmd() -> list[str]:
    """The command that runs the node as a separate process."""
    return [sys.executable, "-m", "dicomnode"]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def forwarders() -> Iterator[list[Forwarder]]:
    """Forwarders a test starts (append them); each is stopped at teardown."""
    started: list[Forwarder] = []
    yield started
    for fw in started:
        fw.stop(5.0)


@pytest.fixture
def node_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def end_process(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """Terminate ``proc`` if it still runs; kill it when it has not ended within ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NodeProcess:
    """A dicomnode started as a child process with a given config file."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            python_cmd() + args, cwd=cwd, env=env, stdout=self._fh, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 15.0) -> int:
        end_process(self.proc, timeout_s)
        self._fh.close()
        return int(self.proc.returncode)


@pytest.fixture
def start_node(tmp_path: Path, node_env: dict[str, str]) -> Iterator:  # type: ignore[type-arg]
    """Start ``python -m dicomnode ARGS`` in tmp_path; wait for ``port`` if given; stop at teardown."""
    started: list[NodeProcess] = []

    def _start(args: list[str], port: int | None = None, cwd: Path | None = None) -> NodeProcess:
        node = NodeProcess(args, cwd or tmp_path, node_env, tmp_path / f"node-{len(started)}.log")
        started.append(node)
        if port is not None:
            try:
                wait_for_port(port, proc=node.proc)
            except AssertionError:
                node.stop()
                raise AssertionError(node.output()) from None
        return node

    yield _start
    for node in started:
        node.stop()


def write_config(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    """Write an INI file from nested dicts and return its path."""
    lines: list[str] = []
    for name, items in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {v}" for k, v in items.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

"""Receiver process pool: several processes share the port, crashed workers restart, none outlive the node."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import peer_env, python_cmd, require_tool, wait_until, write_config
from tests.factories import make_image, save

pytestmark = pytest.mark.interop


def children(pid: int) -> list[int]:
    """Return the receiver worker processes of ``pid`` (not multiprocessing's resource tracker)."""
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    )
    return [
        int(line.split()[0])
        for line in out.stdout.splitlines()
        if "spawn_main" in line and "resource_tracker" not in line
    ]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def pool_node(tmp_path: Path, port: int, start_node):  # type: ignore[no-untyped-def]
    cfg = write_config(
        tmp_path / "c.ini",
        {
            "Network": {"receive_port": port, "receiver_processes": 2},
            "Directories": {"destination_dir": tmp_path / "dest", "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "SCANNER"},
            "Tools": {"enhanced_mr_conversion": "off"},
        },
    )
    node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    assert wait_until(lambda: "processes=2" in node.output(), 20)
    return node


def send(port: int, tmp_path: Path, n: int, tag: str) -> int:
    files = [save(make_image("CT", instance=i), tmp_path / tag / f"{i}.dcm") for i in range(n)]
    return subprocess.run(
        [require_tool("storescu"), "-aet", "SCANNER", "127.0.0.1", str(port), *map(str, files)],
        env=peer_env(),
        capture_output=True,
        timeout=120,
    ).returncode


def test_pool_crashed_worker_is_restarted_and_node_keeps_serving(
    pool_node, port: int, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    workers = children(pool_node.proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    assert wait_until(lambda: "RESTARTING receiver process" in pool_node.output(), 10)
    assert send(port, tmp_path, 20, "a") == 0
    assert (
        len([p for p in (tmp_path / "dest").rglob("*.dcm") if ".incoming-tmp" not in p.parts]) == 20
    )


def test_pool_workers_die_with_killed_node(pool_node, port: int) -> None:  # type: ignore[no-untyped-def]
    workers = children(pool_node.proc.pid)
    pool_node.proc.send_signal(signal.SIGKILL)
    pool_node.proc.wait()
    assert wait_until(
        lambda: all(
            not Path(f"/proc/{w}").exists() or "zombie" in Path(f"/proc/{w}/status").read_text()
            for w in workers
        ),
        10,
    )
    assert wait_until(lambda: port_is_free(port), 10)


def test_pool_second_node_on_same_port_fails(
    pool_node, port: int, tmp_path: Path, start_node
) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(
        tmp_path / "c2.ini",
        {
            "Network": {"receive_port": port, "receiver_processes": 2},
            "Directories": {"destination_dir": tmp_path / "dest2", "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "SCANNER"},
        },
    )
    second = start_node(["--config", str(cfg), "--no-watcher"])
    assert second.proc.wait(30) == 3
    assert "cannot listen" in second.output()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_pool_stop_by_signal_prints_no_traceback_and_keeps_worker_lines(
    pool_node, port: int, tmp_path: Path, signum: int
) -> None:  # type: ignore[no-untyped-def]
    assert send(port, tmp_path, 10, "s") == 0
    assert wait_until(lambda: pool_node.output().count("STORED calling_ae=SCANNER") == 10, 60)
    pool_node.proc.send_signal(signum)
    assert pool_node.proc.wait(60) == 0
    out = pool_node.output()
    assert "Traceback" not in out, out
    assert "Error" not in out.replace("STORE-FAILED", ""), out
    # each worker's own last line (sent while it stops) reaches the parent's log
    assert out.count("STOPPED receiver pid=") == 2, out
    assert "STOPPED receiver processes" in out


def test_pool_ctrl_c_to_the_process_group_prints_no_traceback(
    tmp_path: Path, port: int, node_env: dict[str, str]
) -> None:
    """Ctrl+C in a terminal signals the node and its worker processes together."""
    cfg = write_config(
        tmp_path / "c.ini",
        {
            "Network": {"receive_port": port, "receiver_processes": 2},
            "Directories": {"destination_dir": tmp_path / "dest", "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "SCANNER"},
            "Tools": {"enhanced_mr_conversion": "off"},
        },
    )
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*python_cmd(), "--config", str(cfg), "--no-watcher"],
            cwd=tmp_path,
            env=node_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, like a terminal's foreground job
        )
        try:
            assert wait_until(lambda: "processes=2" in log.read_text(), 60), log.read_text()
            assert send(port, tmp_path, 5, "c") == 0
            assert wait_until(lambda: log.read_text().count("STORED calling_ae=") == 5, 60)
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert text.count("STOPPED receiver pid=") == 2, text


def test_pool_workers_load_no_pixel_codecs(pool_node, port: int, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Workers file objects as received: numpy, GDCM and pylibjpeg (~35 MB) stay out of them,
    and out of a parent that does not forward (--no-watcher)."""
    assert send(port, tmp_path, 2, "codecs") == 0
    workers = children(pool_node.proc.pid)
    assert len(workers) == 2
    for pid in [pool_node.proc.pid, *workers]:
        maps = Path(f"/proc/{pid}/maps").read_text()
        loaded = [name for name in ("gdcm", "numpy", "pylibjpeg", "openjpeg") if name in maps]
        assert loaded == [], f"worker {pid} loaded {loaded}"


def test_pool_process_weighs_the_pool_again_before_each_connection_of_a_burst() -> None:
    """A burst queued before the process looks is not taken whole by the first one awake.

    Four connections wait in the backlog of the shared socket; this process may
    accept (the pool's verdict is always yes here), but it asks again before each
    one, with the connections it is already negotiating counted, so another
    process of the pool can be given the rest.
    """
    from dicomnode.receiver.admission import RefusalLog
    from dicomnode.receiver.pending import Negotiator

    asked: list[tuple[int, int]] = []

    def may_accept(active: int, negotiating: int) -> bool:
        asked.append((active, negotiating))
        return True

    listen = socket.create_server(("127.0.0.1", 0))
    clients = [socket.create_connection(listen.getsockname()) for _ in range(4)]
    negotiator = Negotiator(
        listen, 30.0, 16, 16, lambda *_: None, RefusalLog(60.0), may_accept=may_accept
    )
    negotiator.start()
    try:
        assert wait_until(lambda: negotiator.pending() == 4, 10), negotiator.pending()
        # Asked before each accept, and the new count published right after it.
        expected = [(0, 0), (0, 1), (0, 1), (0, 2), (0, 2), (0, 3), (0, 3), (0, 4)]
        assert wait_until(lambda: asked[:8] == expected, 10), asked
    finally:
        negotiator.stop()
        for client in clients:
            client.close()
        listen.close()


def test_pool_process_publishes_a_connection_it_accepted_before_the_next_arrives() -> None:
    """The other processes see a connection still negotiating here as this process's load.

    Four storescu started a few milliseconds apart were split 3 + 1 between two
    processes in one run of five: the process that had just accepted one still
    showed its load from before, so both took the next. Now the count is
    published as soon as the connection is accepted, with no other arriving.
    """
    from dicomnode.receiver.admission import RefusalLog
    from dicomnode.receiver.pending import Negotiator

    asked: list[tuple[int, int]] = []

    def may_accept(active: int, negotiating: int) -> bool:
        asked.append((active, negotiating))
        return True

    listen = socket.create_server(("127.0.0.1", 0))
    negotiator = Negotiator(
        listen, 30.0, 16, 16, lambda *_: None, RefusalLog(60.0), may_accept=may_accept
    )
    negotiator.start()
    client = socket.create_connection(listen.getsockname())  # silent: stays negotiating
    try:
        assert wait_until(lambda: negotiator.pending() == 1, 10), negotiator.pending()
        assert wait_until(lambda: asked[-1:] == [(0, 1)], 10), asked
        client.close()  # refused at its end of file: the lower count is published too
        assert wait_until(lambda: asked[-1:] == [(0, 0)], 10), asked
    finally:
        negotiator.stop()
        client.close()
        listen.close()

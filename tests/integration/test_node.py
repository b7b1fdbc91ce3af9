"""The node as a process: embedded default answers DCMTK echoscu; clean stop on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import free_port, peer_env, require_tool, wait_until, write_config

pytestmark = pytest.mark.interop


def test_node_embedded_default_answers_echoscu(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    echoscu = require_tool("echoscu")
    node = start_node([], port=11112)  # no config file: embedded default, as `make run`
    result = subprocess.run(
        [echoscu, "-aet", "ANYONE", "-aec", "DICOMNODE", "127.0.0.1", "11112"],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = node.output()
    assert "Configuration loaded from: embedded default" in out
    assert "AE Title: DICOMNODE" in out
    assert "accepted only because the node listens on loopback" in out
    assert (tmp_path / "dicomnode-data" / "received").is_dir()
    assert (tmp_path / "dicomnode-data" / "outgoing").is_dir()
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(60) == 0  # a clean stop takes seconds; a loaded machine is slower
    assert "STOPPED" in node.output()


def test_node_port_in_use_is_one_line_startup_error(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    cfg = write_config(
        tmp_path / "c.ini",
        {
            "Network": {"receive_port": port},
            "Directories": {"destination_dir": tmp_path / "d", "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "A"},
        },
    )
    first = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    second = start_node(["--config", str(cfg), "--no-watcher"])
    assert second.proc.wait(30) == 3
    assert f"cannot listen on 127.0.0.1:{port}" in second.output()
    assert "Traceback" not in second.output()
    assert first.proc.poll() is None


def test_node_verbose_config_logs_debug_and_pynetdicom_stays_quiet(
    tmp_path: Path, start_node
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    log_file = tmp_path / "logs" / "node.log"
    cfg = write_config(
        tmp_path / "c.ini",
        {
            "Network": {"receive_port": port},
            "Directories": {"destination_dir": tmp_path / "d", "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "A"},
            "Logging": {"verbose": "true", "log_file": log_file},
        },
    )
    node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    from dicomnode.verify import echo

    assert echo("127.0.0.1", port, "X", "A").ok
    assert wait_until(lambda: log_file.exists() and "ECHO calling_ae=A" in log_file.read_text(), 10)
    node.stop()
    text = log_file.read_text()
    assert "INFO    dicomnode.receiver" in text and "LISTENING" in text
    # pynetdicom has its own level (WARNING): its per-association INFO/DEBUG chatter stays out
    assert "pynetdicom" not in text

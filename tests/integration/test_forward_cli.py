"""The forwarder as ``python -m dicomnode``: kill -9 mid-send and restart, receive-to-watch chaining."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt

from tests.conftest import (
    files_below,
    free_port,
    peer_env,
    require_tool,
    wait_until,
    write_config,
)
from tests.factories import make_image, save
from tests.integration.test_forward import StoreSCP

pytestmark = pytest.mark.interop


class SlowSCP:
    """pynetdicom SCP that takes ``delay_s`` per C-STORE and records SOP Instance UIDs."""

    def __init__(self, delay_s: float) -> None:
        self.port = free_port()
        self.delay_s = delay_s
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="TARGET")
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert server is not None
        self.server = server

    def _store(self, event):  # type: ignore[no-untyped-def]
        time.sleep(self.delay_s)
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def stop(self) -> None:
        self.server.shutdown()


def forwarder_ini(tmp_path: Path, watch: Path, port: int, **extra: object) -> Path:
    fw: dict[str, object] = {
        "watch_folder": watch,
        "target_aet": "TARGET",
        "target_ip": "127.0.0.1",
        "target_port": port,
        "inactivity_timeout": 0.5,
        "process_timer_interval": 0.2,
        "heartbeat_interval": 1,
        "retry_initial_delay_s": 0.2,
        "retry_max_delay_s": 0.4,
        "dimse_timeout_s": 10,
    }
    fw.update(extra)
    sections: dict[str, dict[str, object]] = {
        "Network": {"receive_port": free_port()},
        "Directories": {"destination_dir": tmp_path / "received", "min_free_space_mb": 0},
        "Security": {"trusted_ae_titles": "SENDER"},
        "FolderWatcher": fw,
    }
    return write_config(tmp_path / "config.ini", sections)


def test_forward_cli_kill_9_mid_send_then_restart_loses_nothing(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    scp = SlowSCP(delay_s=0.15)
    try:
        watch = tmp_path / "watch"
        cts = [make_image("CT", instance=i + 1) for i in range(12)]
        for i, ct in enumerate(cts):
            save(ct, watch / "PAT" / f"{i:02d}.dcm")
        cfg = forwarder_ini(tmp_path, watch, scp.port)
        node = start_node(["--config", str(cfg), "--no-receiver"])
        assert wait_until(lambda: scp.count() >= 4, 30), node.output()
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        left = sorted(p.name for p in (watch / "PAT").iterdir())
        assert 0 < len(left) < 12
        # every file that is gone was acknowledged by the target
        gone = {str(ct.SOPInstanceUID) for i, ct in enumerate(cts) if f"{i:02d}.dcm" not in left}
        assert gone <= set(scp.received)

        node2 = start_node(["--config", str(cfg), "--no-receiver"])
        assert wait_until(lambda: not (watch / "PAT").exists(), 30), node2.output()
        assert {str(ct.SOPInstanceUID) for ct in cts} <= set(scp.received)
        out = node2.output()
        assert "BATCH-READY" in out and "SENT" in out
        assert not (watch / "failed").exists()
    finally:
        scp.stop()


def test_forward_cli_receive_into_watch_folder_chains_to_target(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    storescu = require_tool("storescu")
    target = StoreSCP(tmp_path).start()
    try:
        watch = tmp_path / "watch"
        cfg = forwarder_ini(tmp_path, watch, target.port)
        text = cfg.read_text().replace(
            f"destination_dir = {tmp_path / 'received'}", f"destination_dir = {watch / 'inbox'}"
        )
        cfg.write_text(text)
        port = int(text.split("receive_port = ")[1].split()[0])
        node = start_node(["--config", str(cfg)], port=port)
        files = [
            save(make_image("CT", instance=i + 1), tmp_path / "src" / f"{i}.dcm") for i in range(3)
        ]
        result = subprocess.run(
            [storescu, "-aet", "SENDER", "-aec", "DICOMNODE", "127.0.0.1", str(port)]
            + [str(f) for f in files],
            env=peer_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: len(target.order()) == 3, 30), node.output()
        assert wait_until(
            lambda: (
                not [
                    p
                    for p in files_below(watch / "inbox")
                    if not any(part.startswith(".") for part in p.relative_to(watch).parts)
                ]
            ),
            10,
        ), node.output()
        assert os.path.isdir(watch)
    finally:
        target.stop()

"""``dicomnode echo`` (dicomnode.verify, our own upper layer) against peers nobody here wrote.

DCMTK ``storescp`` answers it; the node itself refuses an untrusted calling AE with a real
A-ASSOCIATE-RJ; a listener that never answers costs at most the timeout; every outcome is one line.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode import cli
from dicomnode.dul import dimse
from dicomnode.dul import pdu as dul
from dicomnode.status import ExitStatus
from dicomnode.verify import echo
from tests.conftest import peer_env, require_tool, wait_for_port, wait_until, write_config

pytestmark = pytest.mark.interop

IMPLICIT = "1.2.840.10008.1.2"


@pytest.fixture
def storescp(tmp_path: Path, port: int) -> Iterator[int]:
    """DCMTK storescp listening on ``port`` as STORESCP (TCP_NODELAY for DCMTK)."""
    proc = subprocess.Popen(
        [require_tool("storescp"), "-aet", "STORESCP", "-od", str(tmp_path), str(port)],
        env=peer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_echo_dcmtk_storescp_answers_success(storescp: int) -> None:
    result = echo("127.0.0.1", storescp, "STORESCP", "ECHOER")
    assert result.ok, result.message
    assert result.message.startswith("ECHO-OK STORESCP@127.0.0.1:")


def test_echo_cli_prints_one_line_and_exits_0(
    storescp: int,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["echo", "127.0.0.1", str(storescp), "--call", "STORESCP"]) == ExitStatus.OK
    out = capsys.readouterr().out.strip()
    assert out.startswith("ECHO-OK") and out.count("\n") == 0


def test_echo_untrusted_calling_ae_is_rejected_by_the_node(
    tmp_path: Path, port: int, start_node
) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(
        tmp_path / "node.ini",
        {
            "General": {"ae_title": "NODE"},
            "Network": {"server_ip": "127.0.0.1", "receive_port": port},
            "Directories": {"destination_dir": tmp_path / "dest", "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "TRUSTED"},
        },
    )
    node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    assert wait_until(lambda: "READY" in node.output(), 20), node.output()
    refused = echo("127.0.0.1", port, "NODE", "STRANGER")
    assert not refused.ok
    assert "association rejected by NODE@127.0.0.1" in refused.message, refused.message
    assert echo("127.0.0.1", port, "NODE", "TRUSTED").ok
    assert wait_until(lambda: "ECHO calling_ae=TRUSTED" in node.output(), 10), node.output()


def test_echo_silent_listener_fails_within_the_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts (backlog), never answers
        silent = server.getsockname()[1]
        started = time.monotonic()
        result = echo("127.0.0.1", silent, "ANY-SCP", "ECHOER", timeout_s=1.0)
        took = time.monotonic() - started
    assert not result.ok
    assert "no association" in result.message and "within 1 s" in result.message, result.message
    assert took < 30  # bounded by the 1 s timeout, not by the peer


def test_echo_refused_connection_is_one_clear_line() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        closed = server.getsockname()[1]
    result = echo("127.0.0.1", closed, "ANY-SCP", "ECHOER", timeout_s=2.0)
    assert not result.ok
    assert result.message.startswith(f"ECHO-FAILED cannot connect to ANY-SCP@127.0.0.1:{closed} ")


def _answer_once(server: socket.socket, response: bytes) -> None:
    """A misbehaving SCP: accept the association, answer the first P-DATA with ``response``."""
    conn, _ = server.accept()
    with conn:
        conn.settimeout(10)
        reader = conn.makefile("rb")

        def pdu() -> tuple[int, bytes]:
            pdu_type, _reserved, length = struct.unpack(">BBI", reader.read(6))
            return pdu_type, reader.read(length)

        _type, body = pdu()
        rq = dul.A_ASSOCIATE_RQ.decode(body)
        result = dul.ContextResult(1, dul.ACCEPTANCE, rq.contexts[0].abstract_syntax, IMPLICIT)
        ac = dul.A_ASSOCIATE_AC(rq.fixed_part, (result,), 16384)
        conn.sendall(ac.encode())
        pdu()  # the C-ECHO-RQ
        conn.sendall(dul.p_data_tf(1, dul.PDV_COMMAND | dul.PDV_LAST, response))
        with contextlib.suppress(OSError):
            pdu()  # the release request
            conn.sendall(dul.A_RELEASE_RP_PDU)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # status 0x0000, but a C-STORE-RSP: not an answer to the echo
        (
            dimse.response_command(dimse.C_STORE_RQ, 1, dimse.VERIFICATION_SOP_CLASS, "", 0),
            "malformed",
        ),
        # a C-ECHO-RSP to another message
        (
            dimse.response_command(dimse.C_ECHO_RQ, 9, dimse.VERIFICATION_SOP_CLASS, "", 0),
            "malformed",
        ),
        (
            dimse.response_command(dimse.C_ECHO_RQ, 1, dimse.VERIFICATION_SOP_CLASS, "", 0x0211),
            "0x0211",
        ),
        (
            dimse.response_command(dimse.C_ECHO_RQ, 1, dimse.VERIFICATION_SOP_CLASS, "", 0),
            "ECHO-OK",
        ),
    ],
    ids=["wrong-command", "wrong-message-id", "failure-status", "success"],
)
def test_echo_judges_the_response_not_just_its_status(response: bytes, expected: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = threading.Thread(target=_answer_once, args=(server, response), daemon=True)
        peer.start()
        result = echo("127.0.0.1", server.getsockname()[1], "ODD", "ECHOER", timeout_s=10)
        peer.join(20)
    assert expected in result.message, result.message
    assert result.ok == (expected == "ECHO-OK")

"""DICOM TLS of the receiver against DCMTK's TLS-enabled storescu/echoscu (issue 6, item 1).

Certificates are made in the test with the ``openssl`` command: a CA the node
trusts (``ca_bundle``), server and client certificates it signed, and a rogue CA
with its own client certificate. The node must store over TLS byte for byte,
refuse peers without an acceptable client certificate (including one from a CA
only the operating system trusts), refuse plain TCP and old protocol versions,
and keep serving while a peer sits in the handshake.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import peer_env, require_tool, wait_until, write_config
from tests.factories import make_image, save
from tests.integration.rawpeer import dataset_bytes, visible_files

pytestmark = pytest.mark.interop

StartNode = Callable[..., Any]


@dataclass(frozen=True)
class Pki:
    """Paths of the test certificates (PEM)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _openssl(*args: str) -> None:
    exe = require_tool("openssl")
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    return cert, key


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(
        f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}"),
        *("-keyout", str(key), "-out", str(csr)),
    )
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1])),
        *("-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)),
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca(folder, "dicom-ca")
    rogue_ca = _make_ca(folder, "rogue-ca")
    server = _make_leaf(folder, "node", ca, "serverAuth")
    client = _make_leaf(folder, "scanner", ca, "clientAuth")
    rogue = _make_leaf(folder, "rogue", rogue_ca, "clientAuth")
    return Pki(ca[0], *server, *client, rogue_ca[0], *rogue)


def _start_tls_node(
    tmp_path: Path,
    port: int,
    start_node: StartNode,
    pki: Pki,
    tls: dict[str, object] | None = None,
    network: dict[str, object] | None = None,
) -> tuple[Any, Path]:
    dest = tmp_path / "dest"
    cfg = write_config(
        tmp_path / "node.ini",
        {
            "General": {"ae_title": "NODE"},
            "Network": {"server_ip": "127.0.0.1", "receive_port": port, **(network or {})},
            "Directories": {"destination_dir": dest, "min_free_space_mb": 0},
            "Security": {"trusted_ae_titles": "SENDER"},
            "Tools": {"enhanced_mr_conversion": "off"},
            "TLS": {
                "enabled": "true",
                "certificate": pki.server_cert,
                "private_key": pki.server_key,
                "ca_bundle": pki.ca,
                "require_client_cert": "true",
                **(tls or {}),
            },
        },
    )
    node = start_node(["--config", str(cfg), "--no-watcher"], port=port)
    assert wait_until(lambda: "READY" in node.output(), 20), node.output()
    return node, dest


def _dcmtk(
    tool: str,
    port: int,
    tls_args: list[str],
    files: list[Path] = (),  # type: ignore[assignment]
) -> subprocess.CompletedProcess[str]:
    exe = require_tool(tool)
    return subprocess.run(
        [exe, "-v", *tls_args, "-aet", "SENDER", "-aec", "NODE", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        env=peer_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _client_tls(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str]:
    cert, key = cert or pki.client_cert, key or pki.client_key
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca)]


def _stored(dest: Path) -> list[Path]:
    return [p for p in visible_files(dest) if p.relative_to(dest).parts[0] != "errors"]


def test_tls_storescu_with_client_certificate_stores_byte_exact(
    tmp_path: Path, port: int, start_node: StartNode, pki: Pki
) -> None:
    node, dest = _start_tls_node(tmp_path, port, start_node, pki)
    files = [save(make_image(instance=i), tmp_path / "send" / f"{i}.dcm") for i in range(3)]
    done = _dcmtk("storescu", port, _client_tls(pki), files)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Received Store Response (Success)") == 3
    stored = _stored(dest)
    assert sorted(dataset_bytes(p) for p in stored) == sorted(dataset_bytes(f) for f in files)
    echo = _dcmtk("echoscu", port, _client_tls(pki))
    assert echo.returncode == 0, echo.stderr
    assert wait_until(lambda: "tls=on" in node.output()), node.output()


def test_tls_peer_without_client_certificate_is_refused(
    tmp_path: Path, port: int, start_node: StartNode, pki: Pki
) -> None:
    node, dest = _start_tls_node(tmp_path, port, start_node, pki)
    path = save(make_image(), tmp_path / "send" / "a.dcm")
    anonymous = _dcmtk("storescu", port, ["+tla", "+cf", str(pki.ca)], [path])
    assert anonymous.returncode != 0
    assert "Success" not in anonymous.stderr
    assert _stored(dest) == []
    assert wait_until(lambda: "REJECTED TLS connection" in node.output()), node.output()
    ok = _dcmtk("echoscu", port, _client_tls(pki))
    assert ok.returncode == 0, ok.stderr


def test_tls_client_certificate_from_os_trusted_ca_outside_bundle_is_refused(
    tmp_path: Path, port: int, start_node: StartNode, pki: Pki, node_env: dict[str, str]
) -> None:
    # The rogue CA is trusted by "the operating system" (OpenSSL's default store);
    # only ca_bundle may decide who is a client.
    node_env["SSL_CERT_FILE"] = str(pki.rogue_ca)
    node, dest = _start_tls_node(tmp_path, port, start_node, pki)
    path = save(make_image(), tmp_path / "send" / "a.dcm")
    rogue = _dcmtk("storescu", port, _client_tls(pki, pki.rogue_cert, pki.rogue_key), [path])
    assert rogue.returncode != 0 or "Success" not in rogue.stderr, rogue.stderr
    assert "Received Store Response (Success)" not in rogue.stderr
    assert _stored(dest) == []
    assert wait_until(lambda: "REJECTED TLS connection" in node.output()), node.output()
    good = _dcmtk("storescu", port, _client_tls(pki), [path])
    assert good.returncode == 0, good.stderr
    assert len(_stored(dest)) == 1


def test_tls_plain_tcp_peer_is_refused_and_node_keeps_serving(
    tmp_path: Path, port: int, start_node: StartNode, pki: Pki
) -> None:
    node, dest = _start_tls_node(tmp_path, port, start_node, pki)
    path = save(make_image(), tmp_path / "send" / "a.dcm")
    plain = _dcmtk("storescu", port, [], [path])
    assert plain.returncode != 0
    assert _stored(dest) == []
    done = _dcmtk("storescu", port, _client_tls(pki), [path])
    assert done.returncode == 0, done.stderr
    assert node.proc.poll() is None


def test_tls_peer_stuck_in_handshake_does_not_block_others(
    tmp_path: Path, port: int, start_node: StartNode, pki: Pki
) -> None:
    node, dest = _start_tls_node(tmp_path, port, start_node, pki, network={"network_timeout_s": 30})
    path = save(make_image(), tmp_path / "send" / "a.dcm")
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        started = time.monotonic()
        done = _dcmtk("storescu", port, _client_tls(pki), [path])
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 10
    finally:
        for sock in silent:
            sock.close()
    assert len(_stored(dest)) == 1
    assert node.proc.poll() is None


def test_tls_min_version_refuses_older_protocol(
    tmp_path: Path, port: int, start_node: StartNode, pki: Pki
) -> None:
    node, _ = _start_tls_node(tmp_path, port, start_node, pki, tls={"min_version": "1.3"})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        pytest.raises(ssl.SSLError),
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.recv(1)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"
    assert wait_until(lambda: "REJECTED TLS connection" in node.output()), node.output()


def test_tls_handshake_trickled_byte_by_byte_is_cut_at_acse_deadline(
    tmp_path: Path, port: int, start_node: StartNode, pki: Pki
) -> None:
    """The handshake and the request share one deadline from accept (issue 13), not a per-read timeout."""
    import select

    node, dest = _start_tls_node(
        tmp_path, port, start_node, pki, network={"acse_timeout_s": 2, "network_timeout_s": 30}
    )
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        client.wrap_bio(incoming, outgoing).do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert len(hello) > 40
    closed_after = None
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for byte in hello:  # one byte every 0.25 s: each read is well within 30 s
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            readable, _, _ = select.select([sock], [], [], 0.25)
            if readable:
                try:
                    if sock.recv(4096, socket.MSG_PEEK) == b"":
                        closed_after = time.monotonic() - started
                        break
                except OSError:
                    closed_after = time.monotonic() - started
                    break
    assert closed_after is not None and closed_after < 12, closed_after
    assert wait_until(lambda: "TLS handshake not completed within acse_timeout_s" in node.output())
    path = save(make_image(), tmp_path / "send" / "a.dcm")
    done = _dcmtk("storescu", port, _client_tls(pki), [path])
    assert done.returncode == 0, done.stderr
    assert len(_stored(dest)) == 1


def test_tls_dicomnode_echo_over_tls_with_and_without_client_certificate(
    tmp_path: Path, port: int, start_node: StartNode, pki: Pki
) -> None:
    """``dicomnode echo``'s own upper layer (dicomnode.verify) speaks DICOM TLS."""
    from dicomnode.verify import echo

    node, _ = _start_tls_node(tmp_path, port, start_node, pki)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    result = echo("127.0.0.1", port, "NODE", "SENDER", timeout_s=20, ssl_context=ctx)
    assert result.ok, result.message
    assert wait_until(lambda: "ECHO calling_ae=SENDER" in node.output()), node.output()
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cafile=str(pki.ca))
    refused = echo("127.0.0.1", port, "NODE", "SENDER", timeout_s=20, ssl_context=anonymous)
    assert not refused.ok
    assert refused.message.startswith("ECHO-FAILED") and "\n" not in refused.message

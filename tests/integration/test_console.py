"""The running node's /metrics, /healthz, console login and the status/audit commands.

A real node (receiver process pool) receives from DCMTK storescu and forwards to
DCMTK storescp; /metrics is parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    free_port,
    peer_env,
    require_tool,
    run_storescu,
    wait_for_port,
    wait_until,
    write_config,
)
from tests.factories import make_image, save
from tests.integration.test_forward import TARGET_AET, StoreSCP

pytestmark = pytest.mark.interop

PATIENT = "CONSOLE01"


def node_config(
    tmp: Path, port: int, web_port: int, target_port: int, **sections: dict[str, object]
) -> Path:
    cfg: dict[str, dict[str, object]] = {
        "General": {"ae_title": "NODE"},
        "Network": {"server_ip": "127.0.0.1", "receive_port": port, "receiver_processes": 2},
        "Directories": {"destination_dir": "data/received"},
        "Security": {"trusted_ae_titles": "STORESCU"},
        "AE_Mappings": {"STORESCU": str(tmp / "data" / "outgoing")},
        "FolderWatcher": {
            "watch_folder": "data/outgoing",
            "target_aet": TARGET_AET,
            "target_ip": "127.0.0.1",
            "target_port": target_port,
            "inactivity_timeout": 1,
            "process_timer_interval": 1,
            "retry_initial_delay_s": 1,
            "retry_max_delay_s": 2,
            "give_up_after_s": 3,
        },
        "Web": {"enabled": "true", "address": "127.0.0.1", "port": web_port},
    }
    for name, items in sections.items():
        cfg[name] = {**cfg.get(name, {}), **items}
    return write_config(tmp / "config.ini", cfg)


def write_series(folder: Path, n: int) -> list[Path]:
    study = "1.2.826.0.1.3680043.8.498.4242"
    series = "1.2.826.0.1.3680043.8.498.4242.1"
    return [
        save(
            make_image(
                "CT", patient_id=PATIENT, study_uid=study, series_uid=series, instance=i + 1
            ),
            folder / f"ct{i}.dcm",
        )
        for i in range(n)
    ]


def storescu(port: int, files: list[Path]) -> None:
    result = run_storescu(port, files, "STORESCU", "NODE")
    assert result.returncode == 0, result.stderr


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(web_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(f"http://127.0.0.1:{web_port}/metrics")
    assert status == 200
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_metrics_match_what_storescu_sent_and_survive_restart(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    target = StoreSCP(tmp_path).start()
    try:
        port, web_port = free_port(), free_port()
        cfg = node_config(tmp_path, port, web_port, target.port)
        node = start_node(["--config", str(cfg)], port=port)
        wait_for_port(web_port)
        files = write_series(tmp_path / "send", 5)
        storescu(port, files)
        assert wait_until(lambda: len(target.order()) == 5, 60), node.output()
        key = (
            "dicomnode_forwarded_objects_total",
            (("destination", f"{TARGET_AET}@127.0.0.1:{target.port}"),),
        )
        assert wait_until(lambda: metrics(web_port).get(key) == 5.0, 30), metrics(web_port)
        values = metrics(web_port)
        assert values[("dicomnode_received_objects_total", (("calling_ae", "STORESCU"),))] == 5.0
        assert values[("dicomnode_store_duration_seconds_count", ())] == 5.0
        assert values[("dicomnode_store_duration_seconds_bucket", (("le", "+Inf"),))] == 5.0
        assert values[("dicomnode_parked_files", ())] == 0.0
        assert values[("dicomnode_active_associations", ())] == 0.0
        assert values[("dicomnode_ledger_available", ())] == 1.0
        assert any(name == "dicomnode_disk_free_bytes" and v > 0 for (name, _), v in values.items())
        assert get(f"http://127.0.0.1:{web_port}/healthz") == (200, "ok\n")

        status = cli("status", "--config", str(cfg), cwd=tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "Health: healthy" in status.stdout and "received 5, forwarded 5" in status.stdout

        # The console's pages show the study (ledger) without a login on loopback.
        code, page = get(f"http://127.0.0.1:{web_port}/studies?patient={PATIENT}")
        assert code == 200 and PATIENT in page and "Synthetic study" in page

        assert node.stop() == 0
        node = start_node(["--config", str(cfg)], port=port)
        wait_for_port(web_port)
        again = metrics(web_port)
        assert again[("dicomnode_received_objects_total", (("calling_ae", "STORESCU"),))] == 5.0
        assert again[key] == 5.0
        assert again[("dicomnode_store_duration_seconds_count", ())] == 5.0
    finally:
        target.stop()

    audit = cli(
        "audit", "--config", str(cfg), "--format", "json", "--patient-id", PATIENT, cwd=tmp_path
    )
    assert audit.returncode == 0, audit.stderr
    events = json.loads(audit.stdout)
    kinds = [e["kind"] for e in events]
    assert kinds.count("stored") == 5 and kinds.count("forwarded") == 5
    stored = [e for e in events if e["kind"] == "stored"]
    assert {e["calling_ae"] for e in stored} == {"STORESCU"}
    assert all(
        e["sop_class"] == "1.2.840.10008.5.1.4.1.1.2" and e["modality"] == "CT" for e in stored
    )
    assert all(e["size"] > 0 and e["path"].endswith(".dcm") for e in stored)
    sent = [e for e in events if e["kind"] == "forwarded"]
    assert {e["destination"] for e in sent} == {f"{TARGET_AET}@127.0.0.1:{target.port}"}
    assert all(e["status"] == "0x0000" and e["duration_ms"] is not None for e in sent)
    csv_out = cli(
        "audit", "--config", str(cfg), "--ae", "STORESCU", "--kind", "stored", cwd=tmp_path
    )
    assert csv_out.returncode == 0 and csv_out.stdout.count("\n") == 6  # header + 5


def test_rejected_association_and_failed_store_are_counted(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    port, web_port = free_port(), free_port()
    cfg = node_config(
        tmp_path, port, web_port, free_port(), Network={"receiver_processes": 1, "max_object_mb": 1}
    )
    start_node(["--config", str(cfg)], port=port)
    wait_for_port(web_port)
    bad = subprocess.run(
        [require_tool("echoscu"), "-aet", "INTRUDER", "-aec", "NODE", "127.0.0.1", str(port)],
        env=peer_env(),
        capture_output=True,
        timeout=60,
    )
    assert bad.returncode != 0
    big = save(make_image("CT", rows=1024, cols=1024, patient_id=PATIENT), tmp_path / "big.dcm")
    run_storescu(port, [big], "STORESCU", "NODE", timeout_s=60)
    reason = ("dicomnode_rejected_associations_total", (("reason", "untrusted_calling_ae"),))
    failure = ("dicomnode_store_failures_total", (("status", "0xA700"),))
    assert wait_until(lambda: metrics(web_port).get(reason) == 1.0, 30), metrics(web_port)
    assert wait_until(lambda: metrics(web_port).get(failure) == 1.0, 30), metrics(web_port)


def test_healthz_503_below_the_disk_guard_and_status_exit_1(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    port, web_port = free_port(), free_port()
    cfg = node_config(
        tmp_path,
        port,
        web_port,
        free_port(),
        Directories={"min_free_space_mb": 10**9},
        Network={"receiver_processes": 1},
    )
    start_node(["--config", str(cfg)], port=port)
    wait_for_port(web_port)
    code, text = get(f"http://127.0.0.1:{web_port}/healthz")
    assert code == 503 and "below min_free_space_mb=1000000000" in text
    status = cli("status", "--config", str(cfg), cwd=tmp_path)
    assert status.returncode == 1 and "NOT HEALTHY" in status.stdout


def test_status_exit_1_when_the_node_does_not_run(tmp_path: Path) -> None:
    cfg = node_config(tmp_path, free_port(), free_port(), free_port())
    status = cli("status", "--config", str(cfg), cwd=tmp_path)
    assert status.returncode == 1 and "does not answer" in status.stdout


def test_non_loopback_console_without_credentials_refuses_to_start(tmp_path: Path) -> None:
    port, web_port = free_port(), free_port()
    cfg = node_config(tmp_path, port, web_port, free_port(), Web={"address": "0.0.0.0"})
    result = cli("--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "not loopback" in result.stderr and "web-passwd" in result.stderr
    assert "READY" not in result.stdout + result.stderr


class Browser:
    """A cookie-keeping HTTP client that does not follow redirects."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                return None

        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), NoRedirect()
        )

    def request(
        self, path: str, form: dict[str, str] | None = None
    ) -> tuple[int, str, dict[str, str]]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(self.base + path, data=data, timeout=30) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)


def test_login_required_with_credentials_rate_limited_and_csrf(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    port, web_port = free_port(), free_port()
    cfg = node_config(tmp_path, port, web_port, free_port(), Network={"receiver_processes": 1})
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomnode",
            "web-passwd",
            "physicist",
            "--config",
            str(cfg),
            "--password-stdin",
        ],
        input="a-long-secret\n",
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    users = tmp_path / "data" / "received" / ".ledger" / "web-users"
    assert "a-long-secret" not in users.read_text() and "physicist:scrypt$" in users.read_text()
    node = start_node(["--config", str(cfg)], port=port)
    wait_for_port(web_port)
    anon = Browser(f"http://127.0.0.1:{web_port}")
    code, _, headers = anon.request("/")
    assert code == 303 and headers["Location"] == "/login"
    assert anon.request("/failed")[0] == 303
    assert anon.request("/metrics")[0] == 200 and anon.request("/healthz")[0] == 200

    user = Browser(f"http://127.0.0.1:{web_port}")
    code, _, headers = user.request("/login", {"user": "physicist", "password": "a-long-secret"})
    assert (
        code == 303
        and "HttpOnly" in headers["Set-Cookie"]
        and "SameSite=Strict" in headers["Set-Cookie"]
    )
    code, page, _ = user.request("/")
    assert code == 200 and "physicist" in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    # Actions need the session's CSRF token.
    assert user.request("/failed/delete", {"path": "/etc/hostname"})[0] == 403
    assert (
        user.request("/failed/delete", {"path": "/etc/hostname", "csrf": csrf.group(1)})[0] == 400
    )

    for _ in range(5):
        assert anon.request("/login", {"user": "physicist", "password": "guess"})[0] == 401
    assert anon.request("/login", {"user": "physicist", "password": "a-long-secret"})[0] == 429
    assert wait_until(lambda: "WEB-LOGIN-LOCKED" in node.output(), 10)
    out = node.output()
    assert out.count("WEB-LOGIN-FAILED user=physicist client=127.0.0.1") == 5
    assert "WEB-LOGIN user=physicist" in out and "a-long-secret" not in out


def test_corrupt_ledger_at_start_is_moved_aside_and_node_receives(
    tmp_path: Path, start_node
) -> None:  # type: ignore[no-untyped-def]
    port, web_port = free_port(), free_port()
    cfg = node_config(tmp_path, port, web_port, free_port(), Network={"receiver_processes": 1})
    ledger = tmp_path / "data" / "received" / ".ledger" / "ledger.sqlite"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"garbage, not SQLite" * 1000)
    node = start_node(["--config", str(cfg)], port=port)
    wait_for_port(web_port)
    storescu(port, write_series(tmp_path / "send", 2))
    key = ("dicomnode_received_objects_total", (("calling_ae", "STORESCU"),))
    assert wait_until(lambda: metrics(web_port).get(key) == 2.0, 30)
    assert "LEDGER-CORRUPT" in node.output()
    assert list(ledger.parent.glob("ledger.sqlite.corrupt-*"))


def test_console_over_https_reusing_the_tls_certificate(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    import ssl

    from tests.integration.test_tls import _make_ca, _make_leaf

    ca = _make_ca(tmp_path, "web-ca")
    cert, key = _make_leaf(tmp_path, "node", ca, "serverAuth")
    port, web_port = free_port(), free_port()
    cfg = node_config(
        tmp_path,
        port,
        web_port,
        free_port(),
        Network={"receiver_processes": 1},
        TLS={"certificate": str(cert), "private_key": str(key)},
        Web={"https": "true"},
    )
    start_node(["--config", str(cfg)], port=port)
    wait_for_port(web_port)
    context = ssl.create_default_context(cafile=str(ca[0]))
    with urllib.request.urlopen(
        f"https://127.0.0.1:{web_port}/healthz", context=context, timeout=20
    ) as resp:
        assert resp.status == 200 and resp.read() == b"ok\n"
    with urllib.request.urlopen(
        f"https://127.0.0.1:{web_port}/", context=context, timeout=20
    ) as resp:
        assert "Secure" in resp.headers["Set-Cookie"] and "Dashboard" in resp.read().decode()
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=20)
    status = cli("status", "--config", str(cfg), cwd=tmp_path)
    assert status.returncode == 0, status.stdout


def test_audit_messages_over_syslog_udp(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    import socket
    import xml.etree.ElementTree as ET

    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(1.0)
    messages: list[bytes] = []

    def collect() -> bool:
        try:
            messages.append(listener.recvfrom(65536)[0])
        except TimeoutError:
            pass
        return False

    try:
        port, web_port = free_port(), free_port()
        cfg = node_config(
            tmp_path,
            port,
            web_port,
            free_port(),
            Network={"receiver_processes": 1},
            Audit={"syslog": f"udp://127.0.0.1:{listener.getsockname()[1]}"},
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dicomnode",
                "web-passwd",
                "ops",
                "--config",
                str(cfg),
                "--password-stdin",
            ],
            input="long-enough-pw\n",
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        start_node(["--config", str(cfg)], port=port)
        wait_for_port(web_port)
        storescu(port, write_series(tmp_path / "send", 2))
        subprocess.run(
            [require_tool("echoscu"), "-aet", "INTRUDER", "-aec", "NODE", "127.0.0.1", str(port)],
            env=peer_env(),
            capture_output=True,
            timeout=60,
        )
        Browser(f"http://127.0.0.1:{web_port}").request(
            "/login", {"user": "ops", "password": "nope"}
        )

        def event_ids() -> set[str]:
            found = set()
            for raw in messages:
                xml = raw[raw.index(b"\xef\xbb\xbf") + 3 :]
                code = ET.fromstring(xml).find("EventIdentification/EventID")
                assert code is not None
                found.add(code.get("csd_code", ""))
            return found

        wait_until(lambda: collect() or {"110104", "110113", "110114"} <= event_ids(), 60)
        assert {"110104", "110113", "110114"} <= event_ids(), messages
        assert all(m.startswith(b"<85>1 ") and b" DICOM+RFC3881 " in m for m in messages)
        transferred = next(
            ET.fromstring(m[m.index(b"\xef\xbb\xbf") + 3 :])
            for m in messages
            if b'csd_code="110104"' in m
        )
        objects = {
            o.get("ParticipantObjectTypeCode"): o.get("ParticipantObjectID")
            for o in transferred.iter("ParticipantObjectIdentification")
        }
        assert objects == {"1": PATIENT, "2": "1.2.826.0.1.3680043.8.498.4242"}
        counts = [c.get("NumberOfInstances") for c in transferred.iter("SOPClass")]
        assert counts == ["2"]
        users = {a.get("UserID") for a in transferred.iter("ActiveParticipant")}
        assert users == {"STORESCU", "NODE"}
    finally:
        listener.close()


def test_queue_log_and_configuration_pages(tmp_path: Path, start_node) -> None:  # type: ignore[no-untyped-def]
    port, web_port = free_port(), free_port()
    key = tmp_path / "secret-node.key"
    cfg = node_config(
        tmp_path,
        port,
        web_port,
        free_port(),  # the target is down: the group backs off
        Network={"receiver_processes": 1},
        FolderWatcher={"give_up_after_s": 3600, "retry_initial_delay_s": 60},
        TLS={"private_key": str(key)},
    )
    node = start_node(["--config", str(cfg)], port=port)
    wait_for_port(web_port)
    storescu(port, write_series(tmp_path / "send", 2))
    assert wait_until(lambda: "RETRY-SCHEDULED" in node.output(), 60), node.output()
    code, page = get(f"http://127.0.0.1:{web_port}/queue")
    assert code == 200 and "backing off after a network failure (attempt 1)" in page
    assert "connection refused" in page.lower() and PATIENT in page
    code, page = get(f"http://127.0.0.1:{web_port}/log?verb=STORED")
    assert code == 200 and page.count("STORED calling_ae=STORESCU") == 2
    assert "RETRY-SCHEDULED" not in page.split('id="log"')[1]
    code, page = get(f"http://127.0.0.1:{web_port}/config")
    assert code == 200 and "private_key = (hidden)" in page and str(key) not in page
    assert "trusted_ae_titles = STORESCU" in page
    code, page = get(f"http://127.0.0.1:{web_port}/")
    assert code == 200 and "backing off: 1" in page and "STORESCU" in page

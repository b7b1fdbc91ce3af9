"""Console building blocks without a server: passwords, sessions, login limiter, health, config keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dicomnode import config
from dicomnode.errors import ConfigError
from dicomnode.web import auth
from dicomnode.web.health import Facts, assess


def test_password_hash_is_salted_scrypt_and_verifies() -> None:
    first = auth.hash_password("correct horse")
    second = auth.hash_password("correct horse")
    assert first.startswith("scrypt$") and first != second  # salted
    assert "correct horse" not in first
    assert auth.verify_password("correct horse", first)
    assert not auth.verify_password("wrong horse", first)
    assert not auth.verify_password("correct horse", "plain$text")


def test_set_password_writes_private_file_without_clear_text(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "web-users"
    auth.set_password(path, "physicist", "s3cret-pass")
    auth.set_password(path, "oncall", "other-pass1")
    text = path.read_text()
    assert "s3cret-pass" not in text and "other-pass1" not in text
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = auth.read_credentials(path)
    assert set(users) == {"physicist", "oncall"}
    assert auth.verify_password("s3cret-pass", users["physicist"])
    with pytest.raises(ValueError):
        auth.set_password(path, "bad user", "long-enough")
    with pytest.raises(ValueError):
        auth.set_password(path, "short", "1234")


def test_login_limiter_locks_after_five_failures_per_address() -> None:
    limiter = auth.LoginLimiter()
    for i in range(auth.MAX_FAILURES):
        assert not limiter.is_locked("10.0.0.9", 100.0 + i)
        limiter.failed("10.0.0.9", 100.0 + i)
    assert limiter.is_locked("10.0.0.9", 110.0)
    assert not limiter.is_locked("10.0.0.8", 110.0)
    assert not limiter.is_locked("10.0.0.9", 110.0 + auth.LOCK_WINDOW_S)


def test_sessions_expire_when_idle() -> None:
    sessions = auth.Sessions(timeout_s=60.0)
    token, session = sessions.create("ops", 1000.0)
    assert sessions.get(token, 1050.0) is session
    assert sessions.get(token, 1100.0) is session  # touched at 1050
    assert sessions.get(token, 1200.0) is None
    assert sessions.get("forged", 1000.0) is None


def _facts(**kw: object) -> Facts:
    base: dict[str, object] = {
        "receiver_listening": True,
        "disk_free_bytes": {"/data": 5_000_000_000},
        "guard_bytes": 100_000_000,
        "forwarder_running": True,
        "failing_groups": {},
        "stuck_after_s": 1200.0,
    }
    base.update(kw)
    return Facts(**base)  # type: ignore[arg-type]


def test_health_reasons() -> None:
    assert assess(_facts()) == []
    assert assess(_facts(receiver_listening=None, forwarder_running=None)) == []
    assert assess(_facts(receiver_listening=False)) == ["receiver is not listening"]
    low = assess(_facts(disk_free_bytes={"/data": 50_000_000}))
    assert len(low) == 1 and "below min_free_space_mb=100" in low[0]
    assert assess(_facts(forwarder_running=False)) == ["forwarder is not running"]
    assert assess(_facts(failing_groups={"g": (600.0, "refused")})) == []
    stuck = assess(_facts(failing_groups={"g": (1300.0, "connection refused")}))
    assert stuck == ["forwarder stuck: group g failing for 1300 s: connection refused"]


def test_web_is_off_in_files_and_on_in_the_embedded_default(tmp_path: Path) -> None:
    embedded = config.load(None)
    assert embedded.web.enabled and embedded.web.address == "127.0.0.1"
    text = "[Security]\ntrusted_ae_titles = A\n"
    from_file = config.parse(text, "x.ini", tmp_path)
    assert not from_file.web.enabled
    assert from_file.ledger.enabled and from_file.ledger.retention_days == 365
    assert from_file.ledger_path == tmp_path / "dicomnode-data/received/.ledger/ledger.sqlite"
    assert from_file.web_credentials == from_file.ledger_path.parent / "web-users"


def test_web_and_ledger_keys_parse_and_validate(tmp_path: Path) -> None:
    text = """[Security]
trusted_ae_titles = A
[TLS]
certificate = node.pem
private_key = node.key
[Ledger]
location = db/ledger.sqlite
retention_days = 30
[Web]
enabled = yes
address = 0.0.0.0
port = 9443
https = true
"""
    cfg = config.parse(text, "x.ini", tmp_path)
    assert cfg.ledger_path == tmp_path / "db/ledger.sqlite" and cfg.ledger.retention_days == 30
    assert cfg.web.https and cfg.web.certificate == tmp_path / "node.pem"  # reuses [TLS]
    assert cfg.web.port == 9443 and cfg.web.address == "0.0.0.0"
    with pytest.raises(ConfigError, match="https = true needs certificate"):
        config.parse("[Security]\ntrusted_ae_titles = A\n[Web]\nhttps = true\n", "x.ini", tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        config.parse("[Security]\ntrusted_ae_titles = A\n[Web]\npassword = x\n", "x.ini", tmp_path)
    lines = config.describe(cfg)
    assert "[Ledger]" in lines and "[Web]" in lines


def test_audit_messages_built_per_study_and_event() -> None:
    import xml.etree.ElementTree as ET

    from dicomnode.ledger.atna import build_messages, frame, parse_target

    rows = [
        {
            "ts": 1.0,
            "kind": "stored",
            "calling_ae": "CT1",
            "peer": "10.0.0.5:4000",
            "patient_id": "P1",
            "study_uid": "1.2.3",
            "sop_class": "1.2.840.10008.5.1.4.1.1.2",
        },
        {
            "ts": 2.0,
            "kind": "stored",
            "calling_ae": "CT1",
            "peer": "10.0.0.5:4000",
            "patient_id": "P1",
            "study_uid": "1.2.3",
            "sop_class": "1.2.840.10008.5.1.4.1.1.2",
        },
        {
            "ts": 3.0,
            "kind": "forwarded",
            "destination": "TPS@10.0.0.9:104",
            "patient_id": "P1",
            "study_uid": "1.2.3",
            "sop_class": "1.2.840.10008.5.1.4.1.1.2",
        },
        {
            "ts": 4.0,
            "kind": "association_rejected",
            "calling_ae": "EVIL",
            "peer": "10.6.6.6:1",
            "reason": "calling AE title not in trusted_ae_titles",
        },
        {
            "ts": 5.0,
            "kind": "console",
            "status": "login-failed",
            "actor": "ops",
            "peer": "10.0.0.7",
        },
        {"ts": 6.0, "kind": "association_accepted", "calling_ae": "CT1"},
    ]
    messages = [ET.fromstring(m) for m in build_messages(rows, "NODE", "host1")]
    by_event = {
        (
            m.find("EventIdentification/EventID").get("csd_code"),  # type: ignore[union-attr]
            m.find("EventIdentification").get("EventActionCode"),
        ): m  # type: ignore[union-attr]
        for m in messages
    }
    assert set(by_event) == {("110104", "C"), ("110104", "R"), ("110113", "E"), ("110114", "E")}
    received = by_event[("110104", "C")]
    assert [c.get("NumberOfInstances") for c in received.iter("SOPClass")] == ["2"]
    sources = [a.get("UserID") for a in received.iter("ActiveParticipant")]
    assert sources == ["CT1", "NODE"]
    login = by_event[("110114", "E")]
    assert login.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]
    framed = frame(b"<x/>", 0.0, "host1")
    assert framed.startswith(
        b"<85>1 1970-01-01T00:00:00.000+00:00 host1 dicomnode - DICOM+RFC3881 - "
    )
    assert framed.endswith(b"\xef\xbb\xbf<x/>")
    assert parse_target("tcp+tls://audit.example:6514").port == 6514
    with pytest.raises(ValueError):
        parse_target("http://audit:80")

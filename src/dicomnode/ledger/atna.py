"""DICOM audit messages (PS3.15 A.5) over syslog (RFC 5424; UDP RFC 5426, TLS RFC 5425).

``[Audit] syslog = udp://host:port`` or ``tcp+tls://host:port`` sends, for the
events the ledger writer has just stored: *DICOM Instances Transferred*
(110104) per calling AE and study for objects received, per destination and
study for objects forwarded; *Security Alert* (110113, Node Authentication) for
rejected associations; *User Authentication* (110114, Login) for console logins
and failed logins. Building a message (:func:`build_messages`, :func:`frame`)
is pure; :class:`AuditSender` sends from its own thread so a slow or absent
audit repository never holds up the ledger. Imports only the standard library.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import queue
import socket
import ssl
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

logger = logging.getLogger(__name__)

#: RFC 5424 PRI: facility 10 (security/authorization), severity 5 (notice).
_PRI: Final = 10 * 8 + 5
_MSGID: Final = "DICOM+RFC3881"


@dataclass(frozen=True, slots=True)
class Target:
    """Where audit messages go: ``udp`` or ``tcp+tls``, host and port."""

    scheme: str
    host: str
    port: int


def parse_target(url: str) -> Target:
    """Return the target of ``udp://host:port`` or ``tcp+tls://host:port``.

    Raises
    ------
    ValueError
        For any other form.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("udp", "tcp+tls") or not parts.hostname or not parts.port:
        raise ValueError(url)
    return Target(parts.scheme, parts.hostname, parts.port)


def _code(parent: ET.Element, tag: str, code: str, scheme: str, meaning: str) -> ET.Element:
    return ET.SubElement(parent, tag, csd_code=code, codeSystemName=scheme, originalText=meaning)


def _message(
    event_id: tuple[str, str, str],
    action: str,
    ts: float,
    outcome: int,
    type_code: tuple[str, str, str] | None = None,
) -> ET.Element:
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        EventActionCode=action,
        EventDateTime=dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        EventOutcomeIndicator=str(outcome),
    )
    _code(ident, "EventID", *event_id)
    if type_code is not None:
        _code(ident, "EventTypeCode", *type_code)
    return root


def _participant(
    root: ET.Element, user_id: str, requestor: bool, role: tuple[str, str, str], address: str = ""
) -> None:
    attrs = {"UserID": user_id, "UserIsRequestor": "true" if requestor else "false"}
    if address:
        attrs["NetworkAccessPointID"] = address
        attrs["NetworkAccessPointTypeCode"] = "2"
    active = ET.SubElement(root, "ActiveParticipant", attrs)
    _code(active, "RoleIDCode", *role)


def _source(root: ET.Element, source_id: str) -> None:
    source = ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=source_id)
    ET.SubElement(source, "AuditSourceTypeCode", csd_code="4")  # application server process


def _patient_and_study(
    root: ET.Element, patient_id: str, study_uid: str, classes: Mapping[str, int]
) -> None:
    if patient_id:
        patient = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            ParticipantObjectID=patient_id,
            ParticipantObjectTypeCode="1",
            ParticipantObjectTypeCodeRole="1",
        )
        ET.SubElement(patient, "ParticipantObjectIDTypeCode", csd_code="2")
    if study_uid:
        study = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            ParticipantObjectID=study_uid,
            ParticipantObjectTypeCode="2",
            ParticipantObjectTypeCodeRole="3",
        )
        _code(study, "ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID")
        description = ET.SubElement(study, "ParticipantObjectDescription")
        for sop_class, count in sorted(classes.items()):
            ET.SubElement(description, "SOPClass", UID=sop_class, NumberOfInstances=str(count))


_SOURCE_ROLE: Final = ("110153", "DCM", "Source Role ID")
_DEST_ROLE: Final = ("110152", "DCM", "Destination Role ID")
_TRANSFERRED: Final = ("110104", "DCM", "DICOM Instances Transferred")


def build_messages(rows: Iterable[Mapping[str, Any]], node_ae: str, hostname: str) -> list[bytes]:
    """Return the audit messages (XML, UTF-8) for a batch of ledger rows."""
    received: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    sent: dict[tuple[str, str, str], dict[str, Any]] = {}
    out: list[ET.Element] = []
    for row in rows:
        kind = row.get("kind")
        if kind == "stored":
            key = (
                str(row.get("calling_ae") or ""),
                str(row.get("peer") or ""),
                str(row.get("patient_id") or ""),
                str(row.get("study_uid") or ""),
            )
            item = received.setdefault(key, {"ts": row["ts"], "classes": {}})
            sop = str(row.get("sop_class") or "")
            item["classes"][sop] = item["classes"].get(sop, 0) + 1
        elif kind == "forwarded":
            key3 = (
                str(row.get("destination") or ""),
                str(row.get("patient_id") or ""),
                str(row.get("study_uid") or ""),
            )
            item = sent.setdefault(key3, {"ts": row["ts"], "classes": {}})
            sop = str(row.get("sop_class") or "")
            item["classes"][sop] = item["classes"].get(sop, 0) + 1
        elif kind == "association_rejected":
            msg = _message(
                ("110113", "DCM", "Security Alert"),
                "E",
                row["ts"],
                4,
                ("110126", "DCM", "Node Authentication"),
            )
            peer = str(row.get("peer") or "")
            _participant(
                msg, str(row.get("calling_ae") or ""), True, _SOURCE_ROLE, peer.rsplit(":", 1)[0]
            )
            _participant(msg, node_ae, False, _DEST_ROLE, hostname)
            _source(msg, node_ae)
            alert = ET.SubElement(
                msg,
                "ParticipantObjectIdentification",
                ParticipantObjectID=str(row.get("calling_ae") or ""),
                ParticipantObjectTypeCode="2",
                ParticipantObjectTypeCodeRole="13",
            )
            ET.SubElement(
                alert,
                "ParticipantObjectIDTypeCode",
                csd_code="110182",
                codeSystemName="DCM",
                originalText="Node ID",
            )
            ET.SubElement(
                alert,
                "ParticipantObjectDetail",
                type="Alert Description",
                value=str(row.get("reason") or ""),
            )
            out.append(msg)
        elif kind == "console" and row.get("status") in ("login", "login-failed"):
            ok = row.get("status") == "login"
            msg = _message(
                ("110114", "DCM", "User Authentication"),
                "E",
                row["ts"],
                0 if ok else 4,
                ("110122", "DCM", "Login"),
            )
            _participant(
                msg,
                str(row.get("actor") or ""),
                True,
                ("110150", "DCM", "Application"),
                str(row.get("peer") or ""),
            )
            _participant(
                msg, f"{node_ae} console", False, ("110150", "DCM", "Application"), hostname
            )
            _source(msg, node_ae)
            out.append(msg)
    for (calling, peer, patient_id, study_uid), item in received.items():
        msg = _message(_TRANSFERRED, "C", item["ts"], 0)
        _participant(msg, calling, False, _SOURCE_ROLE, peer.rsplit(":", 1)[0])
        _participant(msg, node_ae, False, _DEST_ROLE, hostname)
        _source(msg, node_ae)
        _patient_and_study(msg, patient_id, study_uid, item["classes"])
        out.append(msg)
    for (destination, patient_id, study_uid), item in sent.items():
        msg = _message(_TRANSFERRED, "R", item["ts"], 0)
        _participant(msg, node_ae, True, _SOURCE_ROLE, hostname)
        target_ae, _, where = destination.partition("@")
        _participant(msg, target_ae, False, _DEST_ROLE, where.rsplit(":", 1)[0])
        _source(msg, node_ae)
        _patient_and_study(msg, patient_id, study_uid, item["classes"])
        out.append(msg)
    return [ET.tostring(m, encoding="utf-8", xml_declaration=True) for m in out]


def frame(xml: bytes, ts: float, hostname: str, app: str = "dicomnode") -> bytes:
    """Return one RFC 5424 syslog message carrying ``xml`` (UTF-8 with BOM)."""
    stamp = dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")
    header = f"<{_PRI}>1 {stamp} {hostname or '-'} {app} - {_MSGID} - ".encode("ascii", "replace")
    return header + b"\xef\xbb\xbf" + xml


class AuditSender:
    """Send audit messages from a background thread (bounded queue, never blocks the caller).

    Parameters
    ----------
    target : Target
        Where to send.
    node_ae : str
        Our AE title (Audit Source ID and participant).
    ssl_context : ssl.SSLContext, optional
        Client context for ``tcp+tls`` (default: verify against the system's CAs).
    """

    def __init__(
        self, target: Target, node_ae: str, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.target = target
        self.node_ae = node_ae
        self.hostname = socket.gethostname()
        self.ssl_context = ssl_context
        self._queue: queue.Queue[list[dict[str, Any]] | None] = queue.Queue(1000)
        self._thread = threading.Thread(target=self._run, name="dicomnode-audit", daemon=True)
        self._tcp: socket.socket | None = None
        self._warned = False

    def start(self) -> None:
        """Start the sending thread."""
        self._thread.start()

    def submit(self, rows: list[dict[str, Any]]) -> None:
        """Queue a batch of written ledger rows (dropped when the queue is full)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(rows)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (within ``timeout_s``) and stop."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)
        if self._tcp is not None:
            with contextlib.suppress(OSError):
                self._tcp.close()

    def _run(self) -> None:
        while True:
            rows = self._queue.get()
            if rows is None:
                return
            try:
                for xml in build_messages(rows, self.node_ae, self.hostname):
                    self._send(frame(xml, max(r["ts"] for r in rows), self.hostname))
            except Exception as exc:
                if not self._warned:
                    logger.error(
                        "AUDIT-SEND-FAILED %s://%s:%d: %s (audit messages are dropped)",
                        self.target.scheme,
                        self.target.host,
                        self.target.port,
                        exc,
                    )
                    self._warned = True
                if self._tcp is not None:
                    with contextlib.suppress(OSError):
                        self._tcp.close()
                    self._tcp = None
            else:
                self._warned = False

    def _send(self, message: bytes) -> None:
        t = self.target
        if t.scheme == "udp":
            with socket.socket(
                socket.AF_INET6 if ":" in t.host else socket.AF_INET, socket.SOCK_DGRAM
            ) as s:
                s.sendto(message, (t.host, t.port))
            return
        if self._tcp is None:
            ctx = self.ssl_context or ssl.create_default_context()
            raw = socket.create_connection((t.host, t.port), timeout=10.0)
            self._tcp = ctx.wrap_socket(raw, server_hostname=t.host)
        self._tcp.sendall(f"{len(message)} ".encode("ascii") + message)  # RFC 5425 octet counting

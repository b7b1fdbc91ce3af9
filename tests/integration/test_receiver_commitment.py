"""Storage Commitment Push Model SCP (issue 17) with pynetdicom as the requester.

The node runs as a child process; objects are sent with DCMTK storescu; a
pynetdicom AE asks the node to commit them and receives the N-EVENT-REPORT
either on its own association (it negotiated the SCP role for it) or, as an
SCP on its own port named by a ``[Destination:NAME]``, on a new association.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from tests.conftest import free_port, wait_until
from tests.integration.orthanc_peer import OrthancPeer
from tests.integration.test_hardening import StartNode, ok_object, start, storescu

pytestmark = pytest.mark.interop

SC_INSTANCE = "1.2.840.10008.1.20.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
PENDING = ".storage-commitment"


class Reports:
    """N-EVENT-REPORTs a pynetdicom requester received."""

    def __init__(self) -> None:
        self.got: list[tuple[int, Dataset]] = []
        self.event = threading.Event()

    def handler(self, event: Any) -> tuple[int, None]:
        self.got.append((int(event.event_type), event.event_information))
        self.event.set()
        return 0x0000, None

    def wait(self, timeout_s: float = 60.0) -> tuple[int, Dataset]:
        assert self.event.wait(timeout_s), "no N-EVENT-REPORT arrived"
        return self.got[0]


def _action(refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def _request(
    port: int,
    action: Dataset,
    reports: Reports | None,
    aet: str = "SENDER",
    keep_open_s: float = 0.0,
) -> int | None:
    """Send one N-ACTION; with ``reports``, negotiate the SCP role and wait on the association.

    Returns the N-ACTION-RSP status, or None when the association was rejected.
    """
    ae = AE(ae_title=aet)
    ae.add_requested_context(StorageCommitmentPushModel)
    kwargs: dict[str, Any] = {"ae_title": "NODE"}
    if reports is not None:
        kwargs["ext_neg"] = [build_role(StorageCommitmentPushModel, scu_role=True, scp_role=True)]
        kwargs["evt_handlers"] = [(evt.EVT_N_EVENT_REPORT, reports.handler)]
    assoc = ae.associate("127.0.0.1", port, **kwargs)
    if not assoc.is_established:
        return None
    try:
        status, _reply = assoc.send_n_action(action, 1, StorageCommitmentPushModel, SC_INSTANCE)
        if reports is not None and status and status.Status == 0:
            reports.event.wait(keep_open_s or 60.0)
    finally:
        assoc.release()
        ae.shutdown()
    return int(status.Status) if status else -1


def _scp(port: int, reports: Reports, aet: str = "SENDER") -> Any:
    """Start a pynetdicom SCP on ``port`` that receives N-EVENT-REPORTs (the requester's own port)."""
    ae = AE(ae_title=aet)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    return ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
    )


def _refs(info: Dataset, keyword: str) -> dict[str, Dataset]:
    return {str(i.ReferencedSOPInstanceUID): i for i in info.get(keyword, [])}


def _stored_ct(tmp_path: Path, port: int, name: str) -> str:
    path, ds = ok_object(tmp_path, name)
    result = storescu(port, [path])
    assert result.returncode == 0, result.stderr
    return str(ds.SOPInstanceUID)


def test_commitment_same_association_reports_stored_missing_and_class_mismatch(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node)
    good = _stored_ct(tmp_path, port, "good")
    other = _stored_ct(tmp_path, port, "other")
    never = generate_uid()
    action = _action([(CT, good), (CT, never), (MR, other)])
    reports = Reports()

    assert _request(port, action, reports) == 0x0000

    event_type, info = reports.wait()
    assert event_type == 2
    assert info.TransactionUID == action.TransactionUID
    assert set(_refs(info, "ReferencedSOPSequence")) == {good}
    failed = _refs(info, "FailedSOPSequence")
    assert failed[never].FailureReason == 0x0112
    assert failed[other].FailureReason == 0x0119
    assert failed[other].ReferencedSOPClassUID == MR
    assert wait_until(lambda: "COMMIT-FAILED" in node.output(), 20), node.output()
    out = node.output()
    assert f"COMMIT-REQUESTED transaction_uid={action.TransactionUID}" in out
    assert "committed=1 failed=2" in out and "reply=same-association" in out
    assert wait_until(lambda: not list((dest / PENDING).glob("*.json")), 10)
    assert wait_until(lambda: _ledger_kinds(dest) >= {"commit_requested", "commit_failed"}, 20)


def _ledger_kinds(dest: Path) -> set[str]:
    """Return the storage commitment event kinds in the node's ledger (empty while it is absent)."""
    path = dest / ".ledger" / "ledger.sqlite"
    if not path.exists():
        return set()
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT kind FROM events WHERE kind LIKE 'commit%'").fetchall()
    except sqlite3.Error:
        return set()
    return {str(r[0]) for r in rows}


def test_commitment_all_stored_is_event_type_1(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, _dest = start(tmp_path, port, start_node)
    uids = [_stored_ct(tmp_path, port, f"img{i}") for i in range(3)]
    action = _action([(CT, uid) for uid in uids])
    reports = Reports()

    assert _request(port, action, reports) == 0x0000

    event_type, info = reports.wait()
    assert event_type == 1
    assert set(_refs(info, "ReferencedSOPSequence")) == set(uids)
    assert "FailedSOPSequence" not in info
    assert wait_until(lambda: "COMMITTED transaction_uid=" in node.output(), 20), node.output()
    assert "committed=3 failed=0 reply=same-association" in node.output()
    assert wait_until(lambda: "committed" in _ledger_kinds(_dest), 20)


def test_commitment_new_association_to_the_destination_of_the_calling_ae(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    scp_port = free_port()
    node, _dest = start(
        tmp_path,
        port,
        start_node,
        extra={
            "Destination:modality": {"ae_title": "SENDER", "host": "127.0.0.1", "port": scp_port}
        },
    )
    good = _stored_ct(tmp_path, port, "good")
    never = generate_uid()
    reports = Reports()
    server = _scp(scp_port, reports)
    try:
        action = _action([(CT, good), (CT, never)])
        assert _request(port, action, None) == 0x0000  # no role: released at once
        event_type, info = reports.wait()
    finally:
        server.shutdown()
    assert event_type == 2
    assert info.TransactionUID == action.TransactionUID
    assert set(_refs(info, "ReferencedSOPSequence")) == {good}
    assert _refs(info, "FailedSOPSequence")[never].FailureReason == 0x0112
    assert wait_until(lambda: "reply=new-association" in node.output(), 20), node.output()


def test_commitment_without_role_or_destination_is_refused(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node)
    good = _stored_ct(tmp_path, port, "good")
    action = _action([(CT, good)])

    assert _request(port, action, None) == 0x0110

    assert wait_until(lambda: "COMMIT-FAILED" in node.output(), 20), node.output()
    assert "no [Destination:NAME] has ae_title = SENDER" in node.output()
    assert not list((dest / PENDING).glob("*.json"))


def test_commitment_untrusted_ae_is_refused_at_association(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, _dest = start(tmp_path, port, start_node)
    action = _action([(CT, generate_uid())])

    assert _request(port, action, Reports(), aet="EVIL") is None

    assert wait_until(lambda: "REJECTED association" in node.output(), 20), node.output()
    assert "COMMIT-REQUESTED" not in node.output()


def test_commitment_report_survives_restart_while_requester_is_down(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    scp_port = free_port()
    extra = {"Destination:scanner": {"ae_title": "SENDER", "host": "127.0.0.1", "port": scp_port}}
    node, dest = start(tmp_path, port, start_node, extra=extra)
    good = _stored_ct(tmp_path, port, "good")
    action = _action([(CT, good)])

    assert _request(port, action, None) == 0x0000  # requester's SCP is down
    assert wait_until(lambda: "COMMIT-DEFERRED" in node.output(), 30), node.output()
    assert list((dest / PENDING).glob("*.json"))
    node.stop()

    reports = Reports()
    server = _scp(scp_port, reports)
    try:
        node2, _ = start(tmp_path, port, start_node, extra=extra)
        event_type, info = reports.wait(90)
    finally:
        server.shutdown()
    assert event_type == 1
    assert info.TransactionUID == action.TransactionUID
    assert set(_refs(info, "ReferencedSOPSequence")) == {good}
    assert wait_until(lambda: "COMMITTED transaction_uid=" in node2.output(), 20), node2.output()
    assert wait_until(lambda: not list((dest / PENDING).glob("*.json")), 10)


def test_commitment_orthanc_as_requester(tmp_path: Path, port: int, start_node: StartNode) -> None:
    orthanc = OrthancPeer(tmp_path, port)
    try:
        extra = {
            "Destination:orthanc": {
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        }
        node, _dest = start(tmp_path, port, start_node, extra=extra, trusted="ORTHANC, SENDER")
        path, ds = ok_object(tmp_path, "via-orthanc")
        uploaded = orthanc.call("/instances", raw=path.read_bytes())
        orthanc.call("/modalities/node/store", {"Resources": [uploaded["ID"]], "Synchronous": True})
        never = generate_uid()
        job = orthanc.call(
            "/modalities/node/storage-commitment",
            {
                "DicomInstances": [
                    {"SOPClassUID": CT, "SOPInstanceUID": str(ds.SOPInstanceUID)},
                    {"SOPClassUID": CT, "SOPInstanceUID": never},
                ],
                "Timeout": 60,
            },
        )
        report: dict[str, Any] = {}

        def done() -> bool:
            report.update(orthanc.call(job["Path"]))
            return report.get("Status") != "Pending"

        assert wait_until(done, 90, 0.5), (report, node.output())
        assert report["Status"] == "Failure", report
        assert [r["SOPInstanceUID"] for r in report["Success"]] == [str(ds.SOPInstanceUID)]
        assert [(r["SOPInstanceUID"], r["FailureReason"]) for r in report["Failures"]] == [
            (never, 0x0112)
        ]
        assert wait_until(lambda: "COMMIT-FAILED" in node.output(), 20), node.output()
    finally:
        orthanc.stop()

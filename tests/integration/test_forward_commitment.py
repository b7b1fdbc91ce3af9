"""Storage commitment as the forwarder's SCU (issue 17): hold files until the destination commits.

The node runs as a child process with its receiver (the port reports come to)
and its forwarder. The committing destination is Orthanc (reports on a new
association, its normal way) or a pynetdicom AE that accepts C-STOREs and
N-ACTIONs and reports as each test needs: all committed, some failed, late,
never, on the N-ACTION's own association, or only when asked (across a
restart of the node).
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
)

from tests.conftest import (
    files_below,
    free_port,
    wait_until,
    write_config,
)
from tests.factories import make_image, save
from tests.integration.orthanc_peer import OrthancPeer

pytestmark = pytest.mark.interop

SC_INSTANCE = "1.2.840.10008.1.20.1.1"
STORE = ".dicomnode-commitment"


class CommitDest:
    """A pynetdicom destination: stores, accepts N-ACTIONs, reports as told.

    ``mode``: ``report`` (after ``delay_s`` on a new association), ``same`` (on the
    N-ACTION's association), ``never``, ``manual`` (:meth:`report` sends it).
    Instances in ``fail`` are always reported failed (0x0112).
    """

    def __init__(
        self,
        node_port: int,
        mode: str = "report",
        aet: str = "COMMITDEST",
        fail: set[str] | None = None,
        delay_s: float = 0.0,
        only_first: bool = False,
        supports_commitment: bool = True,
    ) -> None:
        self.node_port = node_port
        self.mode = mode
        self.aet = aet
        self.fail = fail or set()
        self.delay_s = delay_s
        self.only_first = only_first
        self.port = free_port()
        self.stored: list[str] = []
        self.actions: list[tuple[str, list[tuple[str, str]]]] = []
        self.report_status: list[int] = []
        #: how many reports fail an instance of ``fail`` (then it is committed)
        self.fail_times = 1_000_000
        self.failed_count: dict[str, int] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title=aet)
        ae.supported_contexts = StoragePresentationContexts
        if supports_commitment:
            ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.ae = ae
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)],
        )

    def _store(self, event: Any) -> int:
        with self.lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: Any) -> tuple[int, None]:
        info = event.action_information
        refs = [
            (str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
            for i in info.ReferencedSOPSequence
        ]
        with self.lock:
            self.actions.append((str(info.TransactionUID), refs))
            first = len(self.actions) == 1
        if self.mode == "report" and (first or not self.only_first):
            threading.Thread(
                target=self.report, args=(len(self.actions) - 1, self.delay_s), daemon=True
            ).start()
        elif self.mode == "same":
            assoc = event.assoc
            index = len(self.actions) - 1
            threading.Thread(target=self._report_same, args=(assoc, index), daemon=True).start()
        return 0x0000, None

    def event_info(self, index: int, transaction: str | None = None) -> tuple[int, Dataset]:
        uid, refs = self.actions[index]
        ds = Dataset()
        ds.TransactionUID = transaction or uid
        ok, bad = [], []
        for sop_class, sop_instance in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            if (
                sop_instance in self.fail
                and self.failed_count.get(sop_instance, 0) < self.fail_times
            ):
                self.failed_count[sop_instance] = self.failed_count.get(sop_instance, 0) + 1
                item.FailureReason = 0x0112
                bad.append(item)
            else:
                ok.append(item)
        if ok:
            ds.ReferencedSOPSequence = ok
        if bad:
            ds.FailedSOPSequence = bad
        return (2 if bad else 1), ds

    def _report_same(self, assoc: Any, index: int) -> None:
        time.sleep(0.2)  # let the N-ACTION-RSP go first (pynetdicom answers after this returns)
        event_type, ds = self.event_info(index)
        status, _ = assoc.send_n_event_report(
            ds, event_type, StorageCommitmentPushModel, SC_INSTANCE
        )
        with self.lock:
            self.report_status.append(int(status.Status) if status else -1)

    def report(
        self,
        index: int,
        delay_s: float = 0.0,
        aet: str | None = None,
        transaction: str | None = None,
    ) -> int:
        """Send the report of N-ACTION ``index`` on a new association to the node; return its status."""
        if delay_s:
            time.sleep(delay_s)
        event_type, ds = self.event_info(index, transaction)
        ae = AE(ae_title=aet or self.aet)
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(
            "127.0.0.1",
            self.node_port,
            ae_title="NODE",
            ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
        )
        result = -2
        if assoc.is_established:
            status, _ = assoc.send_n_event_report(
                ds, event_type, StorageCommitmentPushModel, SC_INSTANCE
            )
            result = int(status.Status) if status else -1
            assoc.release()
        ae.shutdown()
        with self.lock:
            self.report_status.append(result)
        return result

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def node_config(
    tmp_path: Path,
    port: int,
    dest_aet: str,
    dest_port: int,
    web_port: int | None = None,
    twin: bool = False,
    **commit: object,
) -> tuple[Path, Path]:
    watch = tmp_path / "watch"
    watch.mkdir(exist_ok=True)
    sections: dict[str, dict[str, object]] = {
        "General": {"ae_title": "NODE"},
        "Network": {"server_ip": "127.0.0.1", "receive_port": port},
        "Directories": {"destination_dir": tmp_path / "received", "min_free_space_mb": 0},
        "Security": {"trusted_ae_titles": "SENDER"},
        "Tools": {"enhanced_mr_conversion": "off"},
        "FolderWatcher": {
            "watch_folder": watch,
            "target_aet": dest_aet,
            "target_ip": "127.0.0.1",
            "target_port": dest_port,
            "inactivity_timeout": 0.5,
            "process_timer_interval": 0.2,
            "retry_initial_delay_s": 0.2,
            "retry_max_delay_s": 0.5,
            "dimse_timeout_s": 20,
            "heartbeat_interval": 1,
        },
        # no address: it adds its keys to the [FolderWatcher] target (the destination "default")
        "Destination:default": {"storage_commitment": "true", **commit},
    }
    if twin:  # a section describing the target (same AE, host, port) lends it its keys
        del sections["Destination:default"]
        sections["Destination:pacs"] = {
            "ae_title": dest_aet,
            "host": "127.0.0.1",
            "port": dest_port,
            "storage_commitment": "true",
            **commit,
        }
    if web_port is not None:
        sections["Web"] = {"enabled": "true", "address": "127.0.0.1", "port": web_port}
    return write_config(tmp_path / "node.ini", sections), watch


def put_study(watch: Path, count: int, folder: str = "PAT1") -> list[Dataset]:
    datasets = [make_image("CT", instance=i + 1, patient_id=folder) for i in range(count)]
    for i, ds in enumerate(datasets):
        save(ds, watch / folder / f"ct{i:02d}.dcm")
    return datasets


def held(watch: Path) -> list[Path]:
    return files_below(watch / STORE / "held")


def records(watch: Path) -> list[Path]:
    return sorted((watch / STORE).glob("*.json")) if (watch / STORE).exists() else []


def outgoing(watch: Path) -> list[Path]:
    """Files still to send: below the watch folder, not parked, not dicomnode's hidden state."""
    return [
        p
        for p in files_below(watch)
        if p.relative_to(watch).parts[0] != "failed"
        and not p.relative_to(watch).parts[0].startswith(".")
    ]


def settled(watch: Path) -> bool:
    return not outgoing(watch) and not held(watch) and not records(watch)


def ledger_scu_kinds(tmp_path: Path) -> set[str]:
    """Return the kinds of the SCU's storage commitment events in the node's ledger."""
    path = tmp_path / "received" / ".ledger" / "ledger.sqlite"
    if not path.exists():
        return set()
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                "SELECT kind FROM events WHERE kind LIKE 'commit%' AND reason LIKE 'role=scu%'"
            ).fetchall()
    except sqlite3.Error:
        return set()
    return {str(r[0]) for r in rows}


# --------------------------------------------------------------------------- Orthanc


def test_commitment_orthanc_commits_everything_then_files_are_deleted(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    orthanc = OrthancPeer(tmp_path, port)
    try:
        cfg, watch = node_config(
            tmp_path, port, "ORTHANC", orthanc.dicom_port, twin=True, commitment_timeout_s=60
        )
        datasets = put_study(watch, 4)
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: "COMMITTED role=scu" in node.output(), 60), (
            node.output() + orthanc.log_path.read_text(errors="replace")[-3000:]
        )
        assert wait_until(lambda: settled(watch), 20), node.output()
        out = node.output()
        assert "COMMIT-REQUESTED role=scu transaction_uid=" in out
        assert "COMMIT-REPORTED role=scu" in out  # on the node's port, from ORTHANC
        assert "(storage commitment reports only)" in out  # ORTHANC is not a trusted AE
        assert "committed=4 failed=0 reply=new-association" in out
        assert {str(ds.SOPInstanceUID) for ds in datasets} <= orthanc.sop_instance_uids()
        assert not (watch / "failed").exists()
        assert wait_until(
            lambda: ledger_scu_kinds(tmp_path) >= {"commit_requested", "committed"}, 30
        ), ledger_scu_kinds(tmp_path)
    finally:
        orthanc.stop()


# --------------------------------------------------------------------------- pynetdicom destination


def awaiting_gauge(web_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=20) as rsp:
        text = rsp.read().decode()
    return {
        sample.labels["destination"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dicomnode_awaiting_commitment_files"
    }


def dashboard(web_port: int, page: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}{page}", timeout=20) as rsp:
        return str(rsp.read().decode())


def test_commitment_files_held_until_report_then_deleted(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    dest = CommitDest(port, mode="manual")
    web_port = free_port()
    try:
        cfg, watch = node_config(
            tmp_path, port, dest.aet, dest.port, web_port=web_port, commitment_timeout_s=120
        )
        datasets = put_study(watch, 3)
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: len(dest.actions) == 1, 60), node.output()
        # acknowledged but not committed: held in the store, not in the watch folder, not deleted
        assert wait_until(lambda: len(held(watch)) == 3 and len(records(watch)) == 1, 20)
        assert not outgoing(watch)
        # console and /metrics show what awaits commitment, per destination
        address = f"{dest.aet}@127.0.0.1:{dest.port}"
        assert awaiting_gauge(web_port) == {address: 3.0}
        assert '<td class="commitment">3</td>' in dashboard(web_port)
        transaction = dest.actions[0][0]
        assert wait_until(
            lambda: "awaiting-commitment (request 1)" in dashboard(web_port, "/queue"), 20
        )
        assert transaction in dashboard(web_port, "/queue")
        assert wait_until(lambda: "awaiting_commitment=default:3" in node.output(), 20)
        # the destination's AE is let in to report, not to store
        peer = AE(ae_title=dest.aet)
        peer.add_requested_context(CTImageStorage)
        assoc = peer.associate("127.0.0.1", port, ae_title="NODE")
        assert not assoc.is_established or not assoc.accepted_contexts
        if assoc.is_established:
            assoc.release()
        peer.shutdown()
        uids = {str(ds.SOPInstanceUID) for ds in datasets}
        assert {i for _, i in dest.actions[0][1]} == uids
        # a report for an unknown transaction, and one from another AE: refused, nothing changes
        assert dest.report(0, transaction=generate_uid()) not in (0, -2)
        assert dest.report(0, aet="SENDER") not in (0, -2)
        assert len(held(watch)) == 3
        assert "report refused: unknown transaction" in node.output()
        assert "not from this AE" in node.output()
        assert dest.report(0) == 0
        assert wait_until(lambda: settled(watch), 20), node.output()
        assert "COMMITTED role=scu" in node.output()
        assert wait_until(lambda: awaiting_gauge(web_port) == {address: 0.0}, 20)
        assert '<td class="commitment">0</td>' in dashboard(web_port)
    finally:
        dest.stop()


def test_commitment_report_on_the_same_association(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    dest = CommitDest(port, mode="same")
    try:
        cfg, watch = node_config(tmp_path, port, dest.aet, dest.port)
        put_study(watch, 2)
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: "COMMITTED role=scu" in node.output(), 60), node.output()
        assert "reply=same-association" in node.output()
        assert wait_until(lambda: settled(watch), 20), node.output()
        assert wait_until(lambda: dest.report_status == [0], 20), dest.report_status
    finally:
        dest.stop()


def test_commitment_partial_failure_on_the_same_association_resends_then_parks(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    dest = CommitDest(port, mode="same")
    try:
        cfg, watch = node_config(tmp_path, port, dest.aet, dest.port, commitment_max_attempts=2)
        datasets = put_study(watch, 3)
        bad = str(datasets[2].SOPInstanceUID)
        dest.fail = {bad}
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: (watch / "failed" / "send_errors.log").exists(), 90), (
            node.output()
        )
        assert wait_until(lambda: settled(watch), 30), node.output()
        assert dest.stored.count(bad) == 2 and len(dest.actions) == 2
        assert [len(refs) for _, refs in dest.actions] == [3, 1]  # the second asks for it alone
        assert wait_until(lambda: dest.report_status == [0, 0], 20), dest.report_status
        assert "reply=same-association" in node.output()
        assert [p.name for p in files_below(watch / "failed") if p.suffix == ".dcm"] == ["ct02.dcm"]
    finally:
        dest.stop()


def test_commitment_partial_failure_resends_then_parks(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    dest = CommitDest(port, mode="report")
    try:
        cfg, watch = node_config(
            tmp_path, port, dest.aet, dest.port, commitment_max_attempts=2, commitment_timeout_s=60
        )
        datasets = put_study(watch, 3)
        bad = str(datasets[1].SOPInstanceUID)
        dest.fail = {bad}
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: (watch / "failed" / "send_errors.log").exists(), 90), (
            node.output()
        )
        assert wait_until(lambda: settled(watch), 30), node.output()
        out = node.output()
        # sent twice (commitment_max_attempts=2), then parked with the failure reason
        assert dest.stored.count(bad) == 2
        assert len(dest.actions) == 2
        assert "COMMIT-RESEND role=scu" in out
        assert "COMMIT-FAILED role=scu" in out
        parked = [p for p in files_below(watch / "failed") if p.suffix == ".dcm"]
        assert [p.name for p in parked] == ["ct01.dcm"]
        log = (watch / "failed" / "send_errors.log").read_text()
        assert bad in log and "0x0112 no such object instance" in log
        assert "commitment_max_attempts=2" in log
        # the others were committed at the first report and deleted
        assert dest.stored.count(str(datasets[0].SOPInstanceUID)) == 1
        # moved back by the operator, it is sent again (never skipped as a duplicate of the
        # acknowledgement that was not committed), and committed this time
        dest.fail = set()
        done = subprocess.run(
            [sys.executable, "-m", "dicomnode", "retry-failed", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert wait_until(lambda: dest.stored.count(bad) == 3, 60), node.output()
        assert wait_until(
            lambda: (
                settled(watch)
                and not [p for p in files_below(watch / "failed") if p.suffix == ".dcm"]
            ),
            60,
        ), node.output()
    finally:
        dest.stop()


def test_commitment_never_reported_times_out_asks_again_then_parks(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    dest = CommitDest(port, mode="never")
    try:
        cfg, watch = node_config(
            tmp_path, port, dest.aet, dest.port, commitment_max_attempts=2, commitment_timeout_s=1
        )
        put_study(watch, 2)
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: (watch / "failed" / "send_errors.log").exists(), 90), (
            node.output()
        )
        assert wait_until(lambda: settled(watch), 30), node.output()
        assert len(dest.actions) == 2  # asked again once after the first silence
        assert len({uid for uid, _ in dest.actions}) == 2  # each with a new Transaction UID
        log = (watch / "failed" / "send_errors.log").read_text()
        assert "no storage commitment report" in log
        assert len([p for p in files_below(watch / "failed") if p.suffix == ".dcm"]) == 2
    finally:
        dest.stop()


def test_commitment_late_report_to_an_earlier_request_still_counts(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    # the first request is answered only after the timeout (the node has asked again)
    dest = CommitDest(port, mode="report", delay_s=4.0, only_first=True)
    try:
        cfg, watch = node_config(
            tmp_path, port, dest.aet, dest.port, commitment_max_attempts=5, commitment_timeout_s=1
        )
        put_study(watch, 2)
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: "COMMITTED role=scu" in node.output(), 60), node.output()
        assert wait_until(lambda: settled(watch), 20), node.output()
        assert len(dest.actions) >= 2
        assert dest.report_status == [0]
        assert not (watch / "failed").exists()
    finally:
        dest.stop()


def test_commitment_report_after_restart_of_the_node(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    dest = CommitDest(port, mode="manual")
    try:
        cfg, watch = node_config(tmp_path, port, dest.aet, dest.port, commitment_timeout_s=120)
        put_study(watch, 3)
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: "COMMIT-REQUESTED role=scu transaction" in node.output(), 60), (
            node.output()
        )
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        assert len(held(watch)) == 3 and len(records(watch)) == 1
        node2 = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: "READY" in node2.output(), 30), node2.output()
        assert "COMMIT-AWAITING role=scu" in node2.output()
        assert "batches=1 files=3" in node2.output()
        assert dest.report(0) == 0
        assert wait_until(lambda: settled(watch), 30), node2.output()
        assert "COMMITTED role=scu" in node2.output()
        assert not (watch / "failed").exists()
    finally:
        dest.stop()


def test_commitment_with_routes_holds_a_link_while_the_other_destination_is_served(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    committing = CommitDest(port, mode="manual")
    plain = CommitDest(port, mode="never", aet="PLAIN")
    try:
        cfg, watch = node_config(tmp_path, port, plain.aet, plain.port)
        text = cfg.read_text().replace("[Destination:default]\nstorage_commitment = true\n", "")
        cfg.write_text(
            text
            + "\n[Destination:commit]\n"
            + f"ae_title = {committing.aet}\nhost = 127.0.0.1\nport = {committing.port}\n"
            + "storage_commitment = true\ncommitment_timeout_s = 120\n"
            + "\n[Route:both]\ndestinations = default, commit\n"
        )
        datasets = put_study(watch, 2)
        uids = {str(ds.SOPInstanceUID) for ds in datasets}
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: len(committing.actions) == 1, 60), node.output()
        assert wait_until(lambda: set(plain.stored) == uids, 30), node.output()
        # both acknowledged: the watch folder is empty, the committing destination's copy is held
        assert wait_until(lambda: not outgoing(watch), 30), node.output()
        assert len(held(watch)) == 2
        assert not plain.actions  # the plain destination is never asked to commit
        assert committing.report(0) == 0
        assert wait_until(lambda: settled(watch), 30), node.output()
        assert "COMMITTED role=scu" in node.output()
    finally:
        committing.stop()
        plain.stop()


def test_commitment_request_that_cannot_be_made_is_retried_then_parked(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    # the destination stores but does not offer storage commitment: every N-ACTION fails
    dest = CommitDest(port, supports_commitment=False)
    try:
        cfg, watch = node_config(tmp_path, port, dest.aet, dest.port, give_up_after_s=3)
        put_study(watch, 2)
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: (watch / "failed" / "send_errors.log").exists(), 90), (
            node.output()
        )
        assert wait_until(lambda: settled(watch), 30), node.output()
        assert len(dest.stored) == 2  # acknowledged, but never committed: kept, not deleted
        out = node.output()
        assert "did not accept the Storage Commitment Push Model context" in out
        assert "retry_in=" in out
        log = (watch / "failed" / "send_errors.log").read_text()
        assert "give_up_after_s=3" in log
        assert len([p for p in files_below(watch / "failed") if p.suffix == ".dcm"]) == 2
    finally:
        dest.stop()


def test_commitment_failed_once_is_sent_again_then_committed(
    tmp_path: Path, port: int, start_node: Any
) -> None:
    dest = CommitDest(port, mode="report")
    try:
        cfg, watch = node_config(tmp_path, port, dest.aet, dest.port, commitment_max_attempts=3)
        datasets = put_study(watch, 3)
        bad = str(datasets[0].SOPInstanceUID)
        dest.fail, dest.fail_times = {bad}, 1
        node = start_node(["--config", str(cfg)], port=port)
        assert wait_until(lambda: node.output().count("COMMITTED role=scu") == 1, 60), node.output()
        assert wait_until(lambda: settled(watch), 30), node.output()
        out = node.output()
        assert "COMMIT-RESEND role=scu" in out and "send=2/3" in out
        assert dest.stored.count(bad) == 2
        assert [len(refs) for _, refs in dest.actions] == [3, 1]
        assert not (watch / "failed").exists()
    finally:
        dest.stop()

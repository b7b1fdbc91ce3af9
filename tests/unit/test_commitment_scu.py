"""Storage commitment as the forwarder's SCU (issue 17): the pure parts.

Encoding of the N-ACTION-RQ / N-EVENT-REPORT-RSP command sets and of the
Action Information, decoding of the Event Information (checked against
pynetdicom's and pydicom's codecs), the report and silence decisions of
:mod:`dicomnode.forwarder.commitplan`, admission of a committing destination
(commitment only, from its host), the JSON records of the awaiting store and
the ``[Destination:default]`` / ``storage_commitment`` configuration.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode

from dicomnode import config
from dicomnode.awaiting import HeldFile, Record, Report
from dicomnode.dul import dimse
from dicomnode.dul import pdu as dul
from dicomnode.dul.commitment import encode_action_info, parse_event_info
from dicomnode.errors import ConfigError
from dicomnode.forwarder.commitplan import Step, describe_reason, judge_report, next_step
from dicomnode.receiver.negotiation import negotiate
from dicomnode.receiver.policy import decide_association

SC_CLASS = dimse.STORAGE_COMMITMENT_SOP_CLASS
SC_INSTANCE = dimse.STORAGE_COMMITMENT_INSTANCE
CT = "1.2.840.10008.5.1.4.1.1.2"
SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]


# --------------------------------------------------------------------------- encoding


def test_n_action_rq_and_n_event_report_rsp_decode_as_pynetdicom_reads_them() -> None:
    rq = decode(BytesIO(dimse.n_action_rq(7, SC_CLASS, SC_INSTANCE, 1)), True, True)
    assert rq.CommandField == dimse.N_ACTION_RQ
    assert rq.MessageID == 7
    assert rq.RequestedSOPClassUID == SC_CLASS
    assert rq.RequestedSOPInstanceUID == SC_INSTANCE
    assert rq.ActionTypeID == 1
    assert rq.CommandDataSetType != dimse.NO_DATA_SET
    assert rq.CommandGroupLength == len(dimse.n_action_rq(7, SC_CLASS, SC_INSTANCE, 1)) - 12
    rsp = decode(BytesIO(dimse.n_event_report_rsp(9, SC_CLASS, SC_INSTANCE, 2, 0)), True, True)
    assert rsp.CommandField == dimse.N_EVENT_REPORT_RSP
    assert (rsp.MessageIDBeingRespondedTo, rsp.Status, rsp.EventTypeID) == (9, 0, 2)
    failed = decode(
        BytesIO(dimse.n_event_report_rsp(9, SC_CLASS, SC_INSTANCE, 2, 0x0115)), True, True
    )
    assert failed.Status == 0x0115
    assert "EventTypeID" not in failed


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_action_information_decodes_with_pydicom(syntax: str) -> None:
    refs = [(CT, "1.2.3.1"), (CT, "1.2.3.2")]
    raw = encode_action_info("1.2.9", refs, syntax)
    ds = decode(BytesIO(raw), syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)
    assert ds.TransactionUID == "1.2.9"
    assert [
        (i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence
    ] == refs


def _event_info(syntax: str, committed: list[str], failed: list[tuple[str, int]]) -> bytes:
    ds = Dataset()
    ds.TransactionUID = "1.2.9"
    if committed:
        ds.ReferencedSOPSequence = [_item(uid) for uid in committed]
    if failed:
        items = []
        for uid, reason in failed:
            item = _item(uid)
            item.FailureReason = reason
            items.append(item)
        ds.FailedSOPSequence = items
    out = DicomBytesIO()
    out.is_implicit_VR = syntax == ImplicitVRLittleEndian
    out.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(out, ds)
    return out.getvalue()


def _item(uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = uid
    return item


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_event_information_is_parsed(syntax: str) -> None:
    info = parse_event_info(_event_info(syntax, ["1.1", "1.2"], [("1.3", 0x0112)]), syntax)
    assert info.transaction_uid == "1.2.9"
    assert info.committed == ((CT, "1.1"), (CT, "1.2"))
    assert info.failed == ((CT, "1.3", 0x0112),)


def test_event_information_without_transaction_or_uids_is_refused() -> None:
    ds = Dataset()
    ds.ReferencedSOPSequence = [_item("1.1")]
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = True, True
    write_dataset(out, ds)
    with pytest.raises(ValueError, match="Transaction UID"):
        parse_event_info(out.getvalue(), ImplicitVRLittleEndian)
    with pytest.raises(ValueError):
        parse_event_info(b"\x08\x00\x95\x11\xff\xff", ImplicitVRLittleEndian)


# --------------------------------------------------------------------------- decisions


def _record(sends: tuple[int, ...] = (1, 1, 1), **kw: object) -> Record:
    files = tuple(
        HeldFile(CT, f"1.{i}", f"held/b/P/{i}.dcm", f"P/{i}.dcm", s) for i, s in enumerate(sends)
    )
    base: dict[str, object] = {
        "batch": "b",
        "destination": "default",
        "ae_title": "DEST",
        "host": "127.0.0.1",
        "port": 104,
        "group": "P",
        "created": 1000.0,
        "files": files,
    }
    base.update(kw)
    return Record(**base)  # type: ignore[arg-type]


def test_report_all_committed() -> None:
    verdict = judge_report(_record(), ((CT, "1.0"), (CT, "1.1"), (CT, "1.2")), (), 3)
    assert [f.sop_instance for f in verdict.committed] == ["1.0", "1.1", "1.2"]
    assert verdict.failed == 0


def test_report_failed_and_left_out_are_resent_until_the_attempts_are_used() -> None:
    record = _record(sends=(1, 1, 3))
    verdict = judge_report(record, ((CT, "1.0"),), ((CT, "1.1", 0x0112), (CT, "1.2", 0x0110)), 3)
    assert [f.sop_instance for f in verdict.committed] == ["1.0"]
    assert [
        (f.sop_instance, "0x0112 no such object instance" in why) for f, why in verdict.resend
    ] == [("1.1", True)]
    assert [(f.sop_instance, "commitment_max_attempts=3" in why) for f, why in verdict.park] == [
        ("1.2", True)
    ]
    # an instance the report does not name is not committed
    left_out = judge_report(_record(), ((CT, "1.0"), (CT, "1.1")), (), 3)
    assert [(f.sop_instance, "left out" in why) for f, why in left_out.resend] == [("1.2", True)]
    # failed wins over committed when a report names an instance in both
    both = judge_report(
        _record(), ((CT, "1.0"), (CT, "1.1"), (CT, "1.2")), ((CT, "1.0", 0x0119),), 3
    )
    assert [f.sop_instance for f, _ in both.resend] == ["1.0"]
    assert describe_reason(0x0119) == "0x0119 class/instance conflict"


def test_next_step_requests_waits_asks_again_and_parks() -> None:
    fresh = _record()
    assert next_step(fresh, 2000.0, 60, 2, 3600).step is Step.REQUEST
    asked = _record(requests=1, requested_at=2000.0, transactions=("1.9",))
    waiting = next_step(asked, 2030.0, 60, 2, 3600)
    assert (waiting.step, waiting.at) == (Step.WAIT, 2060.0)
    again = next_step(asked, 2061.0, 60, 2, 3600)
    assert again.step is Step.REQUEST and "within 60 s" in again.reason
    twice = _record(requests=2, requested_at=2000.0)
    parked = next_step(twice, 2061.0, 60, 2, 3600)
    assert parked.step is Step.PARK and "commitment_max_attempts=2" in parked.reason


def test_next_step_parks_after_give_up_after_s_of_silence() -> None:
    silent = _record(requests=1, requested_at=5000.0, first_silence=2000.0)
    parked = next_step(silent, 5061.0, 60, 5, 3000)
    assert parked.step is Step.PARK and "give_up_after_s=3000" in parked.reason
    assert next_step(silent, 5061.0, 60, 5, 3600).step is Step.REQUEST


def test_next_step_backs_off_after_network_failures_then_parks() -> None:
    failing = _record(failures=2, first_failure=2000.0, next_attempt=2010.0, last_error="refused")
    step = next_step(failing, 2005.0, 60, 3, 3600)
    assert (step.step, step.at) == (Step.REQUEST, 2010.0)
    gone = next_step(failing, 2000.0 + 3600, 60, 3, 3600)
    assert gone.step is Step.PARK and "give_up_after_s=3600" in gone.reason


def test_next_step_sends_again_before_asking_again() -> None:
    record = _record()
    flagged = Record(
        **{**_as_dict(record), "files": (record.files[0].__class__(CT, "1.0", "h", "o", 1, True),)}
    )
    assert next_step(flagged, 2000.0, 60, 3, 3600).step is Step.RESEND


def _as_dict(record: Record) -> dict[str, object]:
    return {f: getattr(record, f) for f in record.__dataclass_fields__}


def test_record_and_report_round_trip_through_json() -> None:
    record = _record(transactions=("1.8", "1.9"), requests=1, requested_at=5.0, first_silence=4.0)
    assert Record.from_json(record.to_json()) == record
    report = Report("b", "1.9", "DEST", "127.0.0.1:5", ((CT, "1.0"),), ((CT, "1.1", 0x112),), 9.0)
    assert Report.from_json(report.to_json()) == report


# --------------------------------------------------------------------------- admission and config


def _node(tmp_path: Path, extra: str, trusted: str = "SENDER") -> config.NodeConfig:
    path = tmp_path / "c.ini"
    path.write_text(
        f"[Security]\ntrusted_ae_titles = {trusted}\n"
        f"[FolderWatcher]\nwatch_folder = {tmp_path / 'watch'}\n"
        "target_aet = DEST\ntarget_ip = 127.0.0.1\ntarget_port = 4242\n" + extra
    )
    return config.load(path)


def test_destination_default_adds_commitment_to_the_target(tmp_path: Path) -> None:
    cfg = _node(
        tmp_path,
        "[Destination:default]\nstorage_commitment = true\ncommitment_timeout_s = 30\n"
        "commitment_max_attempts = 4\n",
    )
    default = cfg.forwarder.destination("default")
    assert default is not None
    assert (default.ae_title, default.host, default.port) == ("DEST", "127.0.0.1", 4242)
    assert (default.storage_commitment, default.commitment_timeout_s) == (True, 30.0)
    assert default.commitment_max_attempts == 4
    assert cfg.receiver.commitment_store == tmp_path / "watch" / config.COMMITMENT_STORE_NAME
    assert [d.ae_title for d in cfg.receiver.commitment_destinations] == ["DEST"]
    moved = cfg.with_watch_folder(tmp_path / "other")
    assert moved.receiver.commitment_store == tmp_path / "other" / config.COMMITMENT_STORE_NAME
    plain = _node(tmp_path, "")
    assert plain.receiver.commitment_store is None and not plain.receiver.commitment_destinations


def test_a_section_naming_the_target_lends_it_storage_commitment(tmp_path: Path) -> None:
    cfg = _node(
        tmp_path,
        "[Destination:pacs]\nae_title = DEST\nhost = 127.0.0.1\nport = 4242\n"
        "storage_commitment = true\ncommitment_max_attempts = 5\n",
    )
    default = cfg.forwarder.destination("default")
    assert default is not None and default.storage_commitment
    assert default.commitment_max_attempts == 5
    assert [d.name for d in cfg.receiver.commitment_destinations] == ["default"]
    other_port = _node(
        tmp_path,
        "[Destination:pacs]\nae_title = DEST\nhost = 127.0.0.1\nport = 1\n"
        "storage_commitment = true\n",
    )
    assert not other_port.forwarder.destination("default").storage_commitment  # type: ignore[union-attr]


def test_destination_default_with_an_address_and_a_target_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="both define the destination 'default'"):
        _node(tmp_path, "[Destination:default]\nae_title = X\nhost = h\n")
    with pytest.raises(ConfigError, match="commitment_max_attempts"):
        _node(tmp_path, "[Destination:default]\ncommitment_max_attempts = 0\n")


def test_committing_destination_is_admitted_for_commitment_only_from_its_host(
    tmp_path: Path,
) -> None:
    cfg = _node(tmp_path, "[Destination:default]\nstorage_commitment = true\n").receiver
    here = frozenset({"127.0.0.1"})
    decision = decide_association(cfg, "DEST", "ANY", here)
    assert decision.accept and decision.commitment_only
    elsewhere = decide_association(cfg, "DEST", "ANY", frozenset({"10.0.0.9"}))
    assert not elsewhere.accept and elsewhere.reason.startswith("peer address")
    assert not decide_association(cfg, "OTHER", "ANY", here).accept
    trusted = decide_association(cfg, "SENDER", "ANY", here)
    assert trusted.accept and not trusted.commitment_only
    # without storage_commitment the destination's AE is just another untrusted AE
    plain = _node(tmp_path, "").receiver
    assert not decide_association(plain, "DEST", "ANY", here).accept


def test_commitment_only_association_accepts_the_commitment_context_alone() -> None:
    contexts = (
        dul.ProposedContext(1, CT, (ExplicitVRLittleEndian,)),
        dul.ProposedContext(3, SC_CLASS, (ImplicitVRLittleEndian,)),
        dul.ProposedContext(5, "1.2.840.10008.1.1", (ImplicitVRLittleEndian,)),
    )
    results = negotiate(contexts, commitment_only=True)
    assert [r.result == dul.ACCEPTANCE for r in results] == [False, True, False]
    assert all(r.result == dul.ACCEPTANCE for r in negotiate(contexts))

"""Storage commitment encoding (issue 17): role selection items, N-ACTION/N-EVENT-REPORT command
sets and data sets, checked against pynetdicom's decoders; [Destination:NAME] parsing."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC as PynetdicomAC
from pynetdicom.pdu import A_ASSOCIATE_RQ as PynetdicomRQ

from dicomnode import config
from dicomnode.dul import dimse
from dicomnode.dul import pdu as dul
from dicomnode.errors import ConfigError
from dicomnode.receiver import commitment as sc
from dicomnode.receiver.negotiation import accepted_roles, negotiate

SC_CLASS = dimse.STORAGE_COMMITMENT_SOP_CLASS
CT = "1.2.840.10008.5.1.4.1.1.2"


def _rq(roles: tuple[dul.RoleSelection, ...]) -> dul.A_ASSOCIATE_RQ:
    return dul.A_ASSOCIATE_RQ(
        "NODE",
        "SCANNER",
        dul.APPLICATION_CONTEXT,
        (dul.ProposedContext(1, SC_CLASS, (ImplicitVRLittleEndian,)),),
        16384,
        roles=roles,
    )


def test_role_selection_in_request_is_read_by_pynetdicom_and_back() -> None:
    raw = _rq((dul.RoleSelection(SC_CLASS, scu=False, scp=True),)).encode()
    theirs = PynetdicomRQ()
    theirs.decode(raw)
    assert theirs.user_information is not None
    roles = theirs.user_information.role_selection
    assert SC_CLASS in roles
    assert (roles[SC_CLASS].scu_role, roles[SC_CLASS].scp_role) == (0, 1)
    back = dul.A_ASSOCIATE_RQ.decode(raw[6:])
    assert back.roles == (dul.RoleSelection(SC_CLASS, scu=False, scp=True),)


def test_scp_role_is_granted_only_for_an_accepted_storage_commitment_context() -> None:
    proposed = (
        dul.RoleSelection(SC_CLASS, scu=True, scp=True),
        dul.RoleSelection(CT, scu=False, scp=True),
    )
    request = _rq(proposed)
    results = negotiate(request.contexts)
    assert results[0].result == dul.ACCEPTANCE
    granted = accepted_roles(request.roles, results)
    assert granted == (dul.RoleSelection(SC_CLASS, scu=True, scp=True),)
    assert accepted_roles((dul.RoleSelection(SC_CLASS, scu=True, scp=False),), results) == ()
    ac = dul.A_ASSOCIATE_AC(bytes(68), tuple(results), 16384, granted).encode()
    theirs = PynetdicomAC()
    theirs.decode(ac)
    assert theirs.user_information is not None
    assert theirs.user_information.role_selection[SC_CLASS].scp_role == 1
    assert dul.A_ASSOCIATE_AC.decode(ac[6:]).roles == granted


def test_n_event_report_rq_and_n_action_rsp_decode_as_pynetdicom_reads_them() -> None:
    rq = decode(
        BytesIO(dimse.n_event_report_rq(7, SC_CLASS, dimse.STORAGE_COMMITMENT_INSTANCE, 2)),
        True,
        True,
    )
    assert rq.CommandField == 0x0100
    assert rq.MessageID == 7
    assert rq.EventTypeID == 2
    assert rq.AffectedSOPClassUID == SC_CLASS
    assert rq.AffectedSOPInstanceUID == dimse.STORAGE_COMMITMENT_INSTANCE
    assert rq.CommandDataSetType != 0x0101
    rsp = decode(
        BytesIO(dimse.n_action_rsp(9, SC_CLASS, dimse.STORAGE_COMMITMENT_INSTANCE, 1, 0)),
        True,
        True,
    )
    assert (rsp.CommandField, rsp.MessageIDBeingRespondedTo, rsp.Status) == (0x8130, 9, 0)
    assert rsp.ActionTypeID == 1
    assert rsp.CommandDataSetType == 0x0101


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_report_lists_committed_and_failed_with_reasons(syntax: str) -> None:
    ok, gone, other = (
        sc.Reference(CT, "1.2.3.1"),
        sc.Reference(CT, "1.2.3.2"),
        sc.Reference(CT, "1.2.3.3"),
    )
    commitment = sc.Commitment(
        "1.2.9",
        "SCANNER",
        "127.0.0.1:1",
        (ok, gone, other),
        committed=(ok,),
        failed=((gone, sc.NO_SUCH_OBJECT_INSTANCE), (other, sc.CLASS_INSTANCE_CONFLICT)),
        checked=True,
    )
    assert commitment.event_type == sc.SOME_FAILED
    raw = sc.encode_report(commitment, syntax)
    ds = decode(BytesIO(raw), syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)
    assert ds.TransactionUID == "1.2.9"
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.2.3.1"]
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in ds.FailedSOPSequence] == [
        ("1.2.3.2", 0x0112),
        ("1.2.3.3", 0x0119),
    ]
    all_ok = sc.Commitment("1.2.9", "S", "p", (ok,), committed=(ok,), checked=True)
    assert all_ok.event_type == sc.ALL_COMMITTED
    assert "FailedSOPSequence" not in decode(
        BytesIO(sc.encode_report(all_ok, syntax)),
        syntax == ImplicitVRLittleEndian,
        syntax != ExplicitVRBigEndian,
    )
    assert sc.Commitment.from_json(commitment.to_json()) == commitment


def test_action_information_is_parsed_and_bad_ones_refused() -> None:
    ds = Dataset()
    ds.TransactionUID = "1.2.9"
    item = Dataset()
    item.ReferencedSOPClassUID = CT
    item.ReferencedSOPInstanceUID = "1.2.3.1"
    ds.ReferencedSOPSequence = [item]
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = True, True
    write_dataset(out, ds)
    assert sc.parse_action(out.getvalue(), ImplicitVRLittleEndian) == (
        "1.2.9",
        (sc.Reference(CT, "1.2.3.1"),),
    )
    del ds.TransactionUID
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = True, True
    write_dataset(out, ds)
    with pytest.raises(ValueError, match="Transaction UID"):
        sc.parse_action(out.getvalue(), ImplicitVRLittleEndian)


def test_retry_delay_grows_and_is_bounded() -> None:
    delays = [sc.retry_delay(n) for n in range(1, 10)]
    assert delays[0] == sc.FIRST_RETRY_S
    assert delays == sorted(delays)
    assert max(delays) == sc.LONGEST_RETRY_S


BASE = "[Security]\ntrusted_ae_titles = *\n"


def test_destination_sections_are_parsed_and_looked_up_by_ae_title(tmp_path: Path) -> None:
    path = tmp_path / "c.ini"
    path.write_text(
        BASE
        + "[Destination:ct]\nae_title = CT1\nhost = 127.0.0.1\nport = 4242\n"
        + "[Destination:mr]\nae_title = MR1\nhost = mr.local\n"
    )
    cfg = config.load(path)
    assert [(d.name, d.ae_title, d.host, d.port) for d in cfg.receiver.destinations] == [
        ("ct", "CT1", "127.0.0.1", 4242),
        ("mr", "MR1", "mr.local", 104),
    ]
    assert config.destination_for(cfg.receiver.destinations, "MR1") is not None
    assert config.destination_for(cfg.receiver.destinations, "mr1") is None
    assert "[Destination:ct]" in "\n".join(config.describe(cfg))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[Destination:x]\nhost = 127.0.0.1\n", "ae_title is missing"),
        ("[Destination:x]\nae_title = A\nhost = 127.0.0.1\nport = 0\n", "port"),
        ("[Destination:x]\nae_title = A\nhost = h\ncolour = red\n", "unknown key 'colour'"),
        ("[Destination:]\nae_title = A\nhost = h\n", "needs a name"),
        (
            "[Destination:a]\nae_title = A\nhost = h\n[Destination:b]\nae_title = A\nhost = i\n",
            "already",
        ),
    ],
)
def test_destination_section_errors_name_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "c.ini"
    path.write_text(BASE + text)
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_only_a_request_storage_commitment_action_is_served() -> None:
    def req(**kw: object) -> sc.ActionRequest:
        base: dict[str, object] = {
            "sop_class": SC_CLASS,
            "sop_instance": dimse.STORAGE_COMMITMENT_INSTANCE,
            "action_type": 1,
            "data": b"",
            "transfer_syntax": ImplicitVRLittleEndian,
        }
        base.update(kw)
        return sc.ActionRequest(**base)  # type: ignore[arg-type]

    assert sc.judge_action(req()) is None
    assert sc.judge_action(req(sop_class=CT))[0] == sc.NO_SUCH_SOP_CLASS  # type: ignore[index]
    assert sc.judge_action(req(sop_instance="1.2.3"))[0] == sc.NO_SUCH_SOP_INSTANCE  # type: ignore[index]
    assert sc.judge_action(req(action_type=2))[0] == sc.NO_SUCH_ACTION_TYPE  # type: ignore[index]
    assert sc.judge_action(req(data=None))[0] == sc.PROCESSING_FAILURE  # type: ignore[index]

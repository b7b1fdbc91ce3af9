"""The upper-layer codec of both roles (dicomnode.dul) checked against pynetdicom and pydicom.

The requestor's side (A-ASSOCIATE-RQ encoding, A-ASSOCIATE-AC/RJ decoding, PDVs
of a response) and the File Meta reader; the acceptor's side is covered in
test_negotiation.py.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_RQ as PynetdicomRQ
from pynetdicom.pdu import P_DATA_TF as PynetdicomPDATA
from pynetdicom.pdu_primitives import P_DATA

from dicomnode.dul import dimse
from dicomnode.dul import pdu as dul
from dicomnode.dul.meta import MetaError, file_meta, read_file_meta
from tests.factories import make_image, save

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def test_a_associate_rq_encoded_is_decoded_by_pynetdicom() -> None:
    request = dul.A_ASSOCIATE_RQ(
        "TARGET",
        "DICOMNODE",
        dul.APPLICATION_CONTEXT,
        (
            dul.ProposedContext(1, CT, (EXPLICIT_LE, IMPLICIT_LE)),
            dul.ProposedContext(3, "1.2.840.10008.1.1", (IMPLICIT_LE,)),
        ),
        16384,
    )
    raw = request.encode()
    theirs = PynetdicomRQ()
    theirs.decode(raw)
    assert theirs.called_ae_title == "TARGET"
    assert theirs.calling_ae_title == "DICOMNODE"
    assert [
        (c.context_id, c.abstract_syntax, c.transfer_syntax) for c in theirs.presentation_context
    ] == [
        (1, CT, [EXPLICIT_LE, IMPLICIT_LE]),
        (3, "1.2.840.10008.1.1", [IMPLICIT_LE]),
    ]
    assert theirs.user_information is not None
    assert theirs.user_information.maximum_length == 16384
    assert theirs.user_information.implementation_class_uid == dul.IMPLEMENTATION_UID
    # and it reads back into the same request
    back = dul.A_ASSOCIATE_RQ.decode(raw[6:])
    assert (back.called_ae, back.calling_ae, back.contexts, back.max_pdu) == (
        "TARGET",
        "DICOMNODE",
        request.contexts,
        16384,
    )


def test_a_associate_rq_refuses_too_many_contexts_and_bad_titles() -> None:
    contexts = tuple(dul.ProposedContext(2 * i + 1, CT, (EXPLICIT_LE,)) for i in range(129))
    with pytest.raises(ValueError, match="129 presentation contexts"):
        dul.A_ASSOCIATE_RQ("A", "B", dul.APPLICATION_CONTEXT, contexts, 0).encode()
    with pytest.raises(ValueError, match="invalid AE title"):
        dul.A_ASSOCIATE_RQ("A" * 17, "B", dul.APPLICATION_CONTEXT, contexts[:1], 0).encode()


def test_a_associate_ac_round_trip_keeps_results_and_max_pdu() -> None:
    results = (
        dul.ContextResult(1, dul.ACCEPTANCE, CT, EXPLICIT_LE),
        dul.ContextResult(3, dul.ABSTRACT_SYNTAX_NOT_SUPPORTED, "1.2.3", IMPLICIT_LE),
    )
    raw = dul.A_ASSOCIATE_AC(bytes(68), results, 32768).encode()
    assert raw[0] == dul.PduType.A_ASSOCIATE_AC
    back = dul.A_ASSOCIATE_AC.decode(raw[6:])
    assert back.max_pdu == 32768
    assert [(r.context_id, r.result, r.transfer_syntax) for r in back.results] == [
        (1, dul.ACCEPTANCE, EXPLICIT_LE),
        (3, dul.ABSTRACT_SYNTAX_NOT_SUPPORTED, IMPLICIT_LE),
    ]


def test_a_associate_rj_describes_the_reason() -> None:
    raw = dul.A_ASSOCIATE_RJ(1, 1, 3).encode()
    rejection = dul.A_ASSOCIATE_RJ.decode(raw[6:])
    assert rejection.describe() == "permanent, service user: calling AE title not recognized"
    assert (
        dul.A_ASSOCIATE_RJ(2, 3, 1).describe()
        == "transient, service provider: temporary congestion"
    )
    with pytest.raises(ValueError):
        dul.A_ASSOCIATE_RJ.decode(b"\x00")


def test_iter_pdvs_reads_pynetdicom_p_data_tf() -> None:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, b"\x01abcd"], [1, b"\x03ef"]]
    theirs = PynetdicomPDATA()
    theirs.from_primitive(primitive)
    raw = theirs.encode()
    assert list(dul.iter_pdvs(raw[6:])) == [(1, 0x01, b"abcd"), (1, 0x03, b"ef")]
    assert list(dul.iter_pdvs(dul.p_data_tf(5, dul.PDV_LAST, b"xy")[6:])) == [(5, 0x02, b"xy")]
    with pytest.raises(ValueError, match="malformed"):
        list(dul.iter_pdvs(raw[6:-1]))


def test_c_echo_rq_decodes_as_pynetdicom_reads_it() -> None:
    raw = dimse.c_echo_rq(5)
    rq = decode(BytesIO(raw), True, True)
    assert rq.CommandField == dimse.C_ECHO_RQ
    assert rq.MessageID == 5
    assert rq.AffectedSOPClassUID == dimse.VERIFICATION_SOP_CLASS
    assert rq.CommandDataSetType == dimse.NO_DATA_SET
    assert rq.CommandGroupLength == len(raw) - 12


def test_read_file_meta_finds_the_data_set_of_a_pydicom_file(tmp_path: Path) -> None:
    path = save(make_image(), tmp_path / "a.dcm")
    raw = path.read_bytes()
    values, offset = read_file_meta(raw, whole=True)
    (group_length,) = struct.unpack("<I", raw[140:144])
    assert offset == 144 + group_length
    ds = dcmread(path)
    assert values[0x0010].rstrip(b"\x00").decode() == ds.file_meta.TransferSyntaxUID
    with pytest.raises(EOFError):
        read_file_meta(raw[: offset - 3], whole=False)
    with pytest.raises(MetaError, match="past the end"):
        read_file_meta(raw[: offset - 3], whole=True)
    with pytest.raises(MetaError, match="DICM"):
        read_file_meta(raw[132:], whole=True)


def test_file_meta_written_is_read_back() -> None:
    head = file_meta(CT, "1.2.3", EXPLICIT_LE, "SENDER")
    values, offset = read_file_meta(head, whole=True)
    assert offset == len(head)
    assert values[0x0010] == EXPLICIT_LE.encode() + b"\x00"
    assert values[0x0016] == b"SENDER"

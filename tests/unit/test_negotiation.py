"""Lean upper layer and negotiation checked against pynetdicom's and pydicom's own codecs.

Every test decodes our bytes with an independent implementation (pynetdicom
3 PDUs and DIMSE, pydicom Part 10 reading) or feeds our decoders with bytes
pynetdicom encoded, so a shared misreading of PS3.7/PS3.8/PS3.10 cannot hide.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF
from pynetdicom.sop_class import (
    _BASIC_WORKLIST_CLASSES,
    _PRINT_MANAGEMENT_CLASSES,
    _QR_CLASSES,
    _STORAGE_CLASSES,
    _STORAGE_COMMITMENT_CLASSES,
)

from dicomnode.dul import dimse
from dicomnode.dul import pdu as dul
from dicomnode.dul.meta import LONG_VRS, file_meta
from dicomnode.dul.pdu import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    IMPLEMENTATION_UID,
    IMPLEMENTATION_VERSION,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    ContextResult,
    PduType,
    ProposedContext,
    p_data_tf,
)
from dicomnode.receiver.negotiation import is_storage_like, negotiate
from tests.integration.rawpeer import associate_rq_contexts, encode_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"  # 25 characters: odd length
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
PRIVATE_UID = "1.3.6.1.4.1.9590.100.1.2.999"
UNKNOWN_DICOM_UID = "1.2.840.10008.5.1.4.1.1.999999.1"


def rq_pdu(
    calling: str,
    called: str,
    contexts: list[tuple[int, str, list[str]]],
    max_pdu: int,
) -> bytes:
    """Return an A-ASSOCIATE-RQ encoded by pynetdicom (contexts: id, abstract, syntaxes)."""
    return associate_rq_contexts(calling, called, contexts, max_pdu)


def cx(context_id: int, abstract: str, *syntaxes: str) -> ProposedContext:
    return ProposedContext(context_id, abstract, tuple(syntaxes))


# --- 1. parse_associate_rq ------------------------------------------------------------


def test_parse_associate_rq_of_pynetdicom_request() -> None:
    pdu = rq_pdu(
        "SENDER",
        "DICOMNODE",
        [
            (1, CT, [JPEG_LS_LOSSLESS, EXPLICIT_LE, IMPLICIT_LE]),
            (3, VERIFICATION, [IMPLICIT_LE]),
            (5, PRIVATE_UID, [EXPLICIT_LE, IMPLICIT_LE]),
        ],
        max_pdu=32768,
    )
    assert pdu[0] == PduType.A_ASSOCIATE_RQ
    request = dul.A_ASSOCIATE_RQ.decode(pdu[6:])
    assert request.calling_ae == "SENDER"
    assert request.called_ae == "DICOMNODE"
    assert request.application_context == "1.2.840.10008.3.1.1.1"
    assert request.max_pdu == 32768
    assert request.contexts == (
        ProposedContext(1, CT, (JPEG_LS_LOSSLESS, EXPLICIT_LE, IMPLICIT_LE)),
        ProposedContext(3, VERIFICATION, (IMPLICIT_LE,)),
        ProposedContext(5, PRIVATE_UID, (EXPLICIT_LE, IMPLICIT_LE)),
    )
    # Protocol version .. reserved: echoed in the A-ASSOCIATE-AC.
    assert request.fixed_part == pdu[6:74]
    assert request.fixed_part[:2] == b"\x00\x01"


def test_parse_associate_rq_accepts_memoryview_and_unlimited_max_pdu() -> None:
    pdu = rq_pdu("A", "BB", [(7, MR, [EXPLICIT_LE])], max_pdu=0)
    request = dul.A_ASSOCIATE_RQ.decode(memoryview(pdu)[6:])
    assert (request.calling_ae, request.called_ae) == ("A", "BB")
    assert request.contexts == (ProposedContext(7, MR, (EXPLICIT_LE,)),)
    assert request.max_pdu == 0


@pytest.mark.parametrize("length", [0, 10, 67])
def test_parse_associate_rq_too_short(length: int) -> None:
    pdu = rq_pdu("A", "B", [(1, CT, [EXPLICIT_LE])], max_pdu=16384)
    with pytest.raises(ValueError, match="too short"):
        dul.A_ASSOCIATE_RQ.decode(pdu[6 : 6 + length])


# --- 2. is_storage_like ---------------------------------------------------------------


@pytest.mark.parametrize("uid", sorted(set(_STORAGE_CLASSES.values())))
def test_every_pynetdicom_storage_class_is_storage_like(uid: str) -> None:
    assert is_storage_like(uid) is True


# None of the UIDs in these pynetdicom tables is a storage SOP class (checked:
# Q/R FIND/MOVE/GET, Modality Worklist FIND, Storage Commitment Push Model,
# Print Management), so none needs to be excluded.
NON_STORAGE = sorted(
    set(_QR_CLASSES.values())
    | set(_BASIC_WORKLIST_CLASSES.values())
    | set(_STORAGE_COMMITMENT_CLASSES.values())
    | set(_PRINT_MANAGEMENT_CLASSES.values())
)


@pytest.mark.parametrize("uid", NON_STORAGE)
def test_non_storage_services_are_not_storage_like(uid: str) -> None:
    assert is_storage_like(uid) is False


def test_non_storage_table_covers_the_expected_services() -> None:
    assert STUDY_ROOT_FIND in NON_STORAGE
    assert "1.2.840.10008.5.1.4.31" in NON_STORAGE  # Modality Worklist FIND
    assert "1.2.840.10008.1.20.1" in NON_STORAGE  # Storage Commitment Push Model
    assert len(NON_STORAGE) >= 20


def test_verification_is_not_storage_like() -> None:
    # Verification is answered by negotiate's own branch (see the negotiate tests).
    assert is_storage_like(VERIFICATION) is False


@pytest.mark.parametrize("uid", [PRIVATE_UID, UNKNOWN_DICOM_UID])
def test_private_and_unknown_uids_are_storage_like(uid: str) -> None:
    assert is_storage_like(uid) is True


# --- 3. negotiate ---------------------------------------------------------------------


def test_storage_accepted_in_first_proposed_syntax() -> None:
    (result,) = negotiate((cx(1, CT, JPEG_LS_LOSSLESS, EXPLICIT_LE),))
    assert result == ContextResult(1, ACCEPTANCE, CT, JPEG_LS_LOSSLESS)


def test_private_storage_accepted_in_first_proposed_syntax() -> None:
    (result,) = negotiate((cx(9, PRIVATE_UID, IMPLICIT_LE, EXPLICIT_LE),))
    assert result == ContextResult(9, ACCEPTANCE, PRIVATE_UID, IMPLICIT_LE)


def test_verification_with_only_compressed_syntax_refused() -> None:
    (result,) = negotiate((cx(3, VERIFICATION, JPEG_BASELINE),))
    assert result.context_id == 3
    assert result.result == TRANSFER_SYNTAXES_NOT_SUPPORTED == 4


def test_verification_accepted_in_uncompressed_syntax() -> None:
    (result,) = negotiate((cx(5, VERIFICATION, JPEG_BASELINE, IMPLICIT_LE),))
    assert result == ContextResult(5, ACCEPTANCE, VERIFICATION, IMPLICIT_LE)


def test_query_retrieve_refused() -> None:
    (result,) = negotiate((cx(7, STUDY_ROOT_FIND, IMPLICIT_LE),))
    assert result.context_id == 7
    assert result.result == ABSTRACT_SYNTAX_NOT_SUPPORTED == 3


def test_storage_without_transfer_syntax_refused() -> None:
    (result,) = negotiate((cx(11, CT),))
    assert result.context_id == 11
    assert result.result == TRANSFER_SYNTAXES_NOT_SUPPORTED == 4


def test_negotiate_keeps_request_order() -> None:
    proposed = (
        cx(9, STUDY_ROOT_FIND, IMPLICIT_LE),
        cx(1, CT, EXPLICIT_LE),
        cx(5, VERIFICATION, IMPLICIT_LE),
        cx(3, MR, JPEG_LS_LOSSLESS),
    )
    results = negotiate(proposed)
    assert [r.context_id for r in results] == [9, 1, 5, 3]
    assert [r.abstract_syntax for r in results] == [STUDY_ROOT_FIND, CT, VERIFICATION, MR]
    assert [r.result for r in results] == [3, 0, 0, 0]
    assert negotiate(()) == []


# --- 4. associate_ac ------------------------------------------------------------------


def test_associate_ac_decoded_by_pynetdicom() -> None:
    pdu = rq_pdu(
        "SENDER",
        "DICOMNODE",
        [
            (1, CT, [JPEG_LS_LOSSLESS, EXPLICIT_LE]),
            (3, VERIFICATION, [JPEG_BASELINE, IMPLICIT_LE]),
            (5, STUDY_ROOT_FIND, [IMPLICIT_LE]),
            (7, VERIFICATION, [JPEG_BASELINE]),
        ],
        max_pdu=16384,
    )
    request = dul.A_ASSOCIATE_RQ.decode(pdu[6:])
    raw = dul.A_ASSOCIATE_AC(request.fixed_part, tuple(negotiate(request.contexts)), 65536).encode()
    assert raw[0] == PduType.A_ASSOCIATE_AC
    assert struct.unpack(">I", raw[2:6])[0] == len(raw) - 6

    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    assert ac.pdu_length == len(raw) - 6
    assert ac.protocol_version == 1
    assert ac.reserved_aet == "DICOMNODE"
    assert ac.reserved_aec == "SENDER"
    assert ac.application_context_name == "1.2.840.10008.3.1.1.1"
    got = [(c.context_id, c.result) for c in ac.presentation_context]
    assert got == [(1, 0), (3, 0), (5, 3), (7, 4)]
    accepted = {c.context_id: c.transfer_syntax for c in ac.presentation_context if c.result == 0}
    assert accepted == {1: JPEG_LS_LOSSLESS, 3: IMPLICIT_LE}

    user = ac.user_information
    assert user is not None
    assert user.maximum_length == 65536
    assert user.implementation_class_uid == IMPLEMENTATION_UID
    assert user.implementation_version_name == IMPLEMENTATION_VERSION
    assert 1 <= len(IMPLEMENTATION_VERSION) <= 16


def test_associate_ac_unlimited_max_pdu() -> None:
    request = dul.A_ASSOCIATE_RQ.decode(rq_pdu("A", "B", [(1, CT, [EXPLICIT_LE])], 0)[6:])
    ac = A_ASSOCIATE_AC()
    ac.decode(
        dul.A_ASSOCIATE_AC(request.fixed_part, tuple(negotiate(request.contexts)), 0).encode()
    )
    assert ac.user_information is not None
    assert ac.user_information.maximum_length == 0
    (context,) = ac.presentation_context
    assert (context.context_id, context.result, context.transfer_syntax) == (1, 0, EXPLICIT_LE)


# --- 5. associate_rj ------------------------------------------------------------------


def test_associate_rj_decoded_by_pynetdicom() -> None:
    raw = dul.A_ASSOCIATE_RJ(1, 1, 3).encode()
    assert raw == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x03"
    rj = A_ASSOCIATE_RJ()
    rj.decode(raw)
    assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 1, 3)
    assert rj.pdu_length == 4


# --- 6. response_command --------------------------------------------------------------


def test_store_response_decoded_by_pynetdicom() -> None:
    raw = dimse.response_command(0x0001, 7, CT, "1.2.3.4", 0xA700)
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.CommandDataSetType == 0x0101
    assert ds.Status == 0xA700
    assert ds.AffectedSOPClassUID == CT
    assert ds.AffectedSOPInstanceUID == "1.2.3.4"
    # Group length element: tag (4) + length (4) + value (4) = 12 bytes.
    assert ds.CommandGroupLength == len(raw) - 12
    # Elements in ascending tag order (PS3.5 7.1), read in wire order.
    tags = list(dimse.parse_command(raw))
    assert tags == [0x0, 0x2, 0x100, 0x120, 0x800, 0x900, 0x1000]


def test_store_response_matches_pynetdicom_encoding() -> None:
    sop_instance = "1.2.3.4.5"  # odd length, padded with NUL
    prim = C_STORE()
    prim.MessageIDBeingRespondedTo = 7
    prim.AffectedSOPClassUID = CT
    prim.AffectedSOPInstanceUID = sop_instance
    prim.Status = 0xA700
    msg = C_STORE_RSP()
    msg.primitive_to_message(prim)
    expected = encode(msg.command_set, True, True)
    assert expected is not None
    assert dimse.response_command(0x0001, 7, CT, sop_instance, 0xA700) == expected


def test_echo_response_has_no_instance_uid() -> None:
    raw = dimse.response_command(0x0030, 3, VERIFICATION, "", 0x0000)
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandField == 0x8030
    assert ds.MessageIDBeingRespondedTo == 3
    assert ds.Status == 0
    assert ds.AffectedSOPClassUID == VERIFICATION
    assert "AffectedSOPInstanceUID" not in ds
    assert ds.CommandGroupLength == len(raw) - 12

    prim = C_ECHO()
    prim.MessageIDBeingRespondedTo = 3
    prim.AffectedSOPClassUID = VERIFICATION
    prim.Status = 0x0000
    msg = C_ECHO_RSP()
    msg.primitive_to_message(prim)
    assert raw == encode(msg.command_set, True, True)


def test_response_without_sop_class() -> None:
    raw = dimse.response_command(0x0001, 2, "", "1.2.3", 0x0000)
    ds = decode(BytesIO(raw), True, True)
    assert "AffectedSOPClassUID" not in ds
    assert ds.AffectedSOPInstanceUID == "1.2.3"
    assert ds.CommandField == 0x8001
    assert ds.CommandGroupLength == len(raw) - 12


# --- 7. file_meta ---------------------------------------------------------------------


def small_dataset(sop_instance: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop_instance
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P123"
    ds.Modality = "CT"
    ds.Rows = 2
    ds.Columns = 3
    ds.PixelSpacing = ["0.5", "0.75"]
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT
    ref.ReferencedSOPInstanceUID = "1.2.3.9"
    ds.ReferencedImageSequence = Sequence([ref])
    return ds


def walk_meta(meta: bytes) -> list[tuple[int, bytes, int]]:
    """Return (element, VR, value length) of every Explicit VR LE group 0002 element."""
    out = []
    pos = 0
    while pos < len(meta):
        group, elem, vr = struct.unpack_from("<HH2s", meta, pos)
        assert group == 0x0002
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", meta, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", meta, pos + 6)
            pos += 8 + length
        out.append((elem, vr, length))
    assert pos == len(meta)
    return out


@pytest.mark.parametrize("source_ae", ["SCANNER", "ABC"])
def test_file_meta_read_by_pydicom(tmp_path: Path, source_ae: str) -> None:
    sop_instance = "1.2.826.0.1.3680043.8.498.12345"  # 31 characters: odd length
    meta = file_meta(CT, sop_instance, EXPLICIT_LE, source_ae)
    assert meta[:132] == bytes(128) + b"DICM"
    assert len(meta) % 2 == 0
    # Group length counts the bytes after itself up to the data set.
    assert meta[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    assert struct.unpack("<I", meta[140:144])[0] == len(meta) - 144
    elements = walk_meta(meta[144:])
    assert [e for e, _, _ in elements] == [0x01, 0x02, 0x03, 0x10, 0x12, 0x13, 0x16]
    assert all(length % 2 == 0 for _, _, length in elements)

    original = small_dataset(sop_instance)
    path = tmp_path / "obj.dcm"
    path.write_bytes(meta + encode_dataset(original))

    read = dcmread(path, force=False)
    fm = read.file_meta
    assert fm.FileMetaInformationVersion == b"\x00\x01"
    assert fm.MediaStorageSOPClassUID == CT
    assert fm.MediaStorageSOPInstanceUID == sop_instance
    assert fm.TransferSyntaxUID == EXPLICIT_LE
    assert fm.ImplementationClassUID == IMPLEMENTATION_UID
    assert fm.ImplementationVersionName == IMPLEMENTATION_VERSION
    assert fm.SourceApplicationEntityTitle == source_ae
    assert fm.FileMetaInformationGroupLength == len(meta) - 144

    assert [e.tag for e in read] == [e.tag for e in original]
    for elem in original:
        assert read[elem.tag].VR == elem.VR
        assert read[elem.tag].value == elem.value
    assert read.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.9"


def test_file_meta_odd_ae_is_space_padded() -> None:
    meta = file_meta(CT, "1.2.3", EXPLICIT_LE, "ABC")
    assert meta.endswith(b"\x02\x00\x16\x00AE\x04\x00ABC ")


def test_file_meta_odd_uid_is_nul_padded() -> None:
    meta = file_meta(CT, "1.2.3", EXPLICIT_LE, "")
    assert b"\x02\x00\x02\x00UI\x1a\x00" + CT.encode() + b"\x00" in meta
    assert b"\x02\x00\x03\x00UI\x06\x001.2.3\x00" in meta
    # No source AE: the element is left out.
    assert [e for e, _, _ in walk_meta(meta[144:])] == [0x01, 0x02, 0x03, 0x10, 0x12, 0x13]


# --- 8. command sets ------------------------------------------------------------------


def test_command_set_round_trip() -> None:
    elements = [
        (dimse.AFFECTED_SOP_CLASS, CT.encode()),
        (dimse.COMMAND_FIELD, dimse.us(dimse.C_STORE_RQ)),
        (dimse.MESSAGE_ID, dimse.us(42)),
        (dimse.DATA_SET_TYPE, dimse.us(0x0000)),
        (dimse.AFFECTED_SOP_INSTANCE, b"1.2.3"),
    ]
    raw = dimse.command_set(elements)
    parsed = dimse.parse_command(raw)
    assert list(parsed) == [0x00000000] + [tag for tag, _ in elements]
    assert struct.unpack("<I", parsed[0])[0] == len(raw) - 12
    assert parsed[dimse.AFFECTED_SOP_CLASS] == CT.encode() + b"\x00"
    assert parsed[dimse.AFFECTED_SOP_INSTANCE] == b"1.2.3\x00"
    assert dimse.command_us(parsed, dimse.COMMAND_FIELD) == 0x0001
    assert dimse.command_us(parsed, dimse.MESSAGE_ID) == 42
    assert dimse.command_us(parsed, dimse.DATA_SET_TYPE) == 0
    # pydicom reads the same bytes identically.
    ds = decode(BytesIO(raw), True, True)
    assert ds.MessageID == 42
    assert ds.AffectedSOPInstanceUID == "1.2.3"


def test_parse_command_truncated() -> None:
    raw = dimse.command_set([(dimse.MESSAGE_ID, dimse.us(1))])
    with pytest.raises(ValueError, match="truncated"):
        dimse.parse_command(raw[:-1])


def test_command_us_missing_tag() -> None:
    parsed = dimse.parse_command(dimse.command_set([(dimse.MESSAGE_ID, dimse.us(5))]))
    assert dimse.command_us(parsed, dimse.STATUS) is None
    assert dimse.command_us(parsed, dimse.MESSAGE_ID) == 5


# --- 9. p_data_pdu --------------------------------------------------------------------


def test_p_data_pdu_decoded_by_pynetdicom() -> None:
    raw = p_data_tf(3, 0x03, b"abcd")
    assert raw[0] == 0x04
    assert raw[1] == 0x00
    assert struct.unpack(">I", raw[2:6])[0] == 10 == len(raw) - 6
    assert struct.unpack(">I", raw[6:10])[0] == 6  # context id + control + data
    assert raw[10] == 3
    assert raw[11] == 0x03
    assert raw[12:] == b"abcd"

    pdu = P_DATA_TF()
    pdu.decode(raw)
    assert pdu.pdu_length == 10
    (pdv,) = pdu.presentation_data_value_items
    assert pdv.context_id == 3
    assert pdv.data == b"\x03abcd"  # message control header, then the fragment

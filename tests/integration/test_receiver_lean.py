"""Behaviour the lean receiver (the node's one SCP) decides itself.

The receiver, hardening, TLS and pool suites cover the node's guarantees;
these tests cover what only the SCP's own upper layer decides: requests it does not
serve, protocol violations, the File Meta Information it writes, and its
temp files. Peers are DCMTK and PDUs encoded by pynetdicom.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_FIND_RQ
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

from dicomnode.dul.pdu import IMPLEMENTATION_UID
from tests.conftest import wait_until
from tests.integration.rawpeer import (
    PDU_ASSOCIATE_AC,
    PDU_ASSOCIATE_RJ,
    PDU_DATA,
    RawPeer,
    dataset_bytes,
    encode_dataset,
    message_pdus,
    store_pdus,
)
from tests.integration.test_hardening import (
    StartNode,
    assert_logged,
    echoscu,
    errors_entries,
    ok_object,
    path_uid,
    start,
    stored,
    storescu,
)

pytestmark = pytest.mark.interop

LEAN = {"receiver_transport": "lean", "receiver_processes": 1}


def _find_pdus(message_id: int = 5) -> list[bytes]:
    """P-DATA-TF PDUs of a C-FIND-RQ (Patient level) on presentation context 1."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "PATIENT"
    identifier.PatientName = "*"
    prim = C_FIND()
    prim.MessageID = message_id
    prim.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.1.1"
    prim.Priority = 2
    prim.Identifier = BytesIO(encode_dataset(identifier, implicit=True))
    msg = C_FIND_RQ()
    msg.primitive_to_message(prim)
    return message_pdus(msg)


def _response(body: bytes) -> Dataset:
    """Decode the command set of a one-PDV P-DATA-TF body."""
    return decode(BytesIO(body[6:]), True, True)


def test_lean_unserved_dimse_request_gets_0211_and_association_goes_on(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node, network=LEAN)
    path, ds = ok_object(tmp_path, "after-find")
    with RawPeer(port) as peer:
        assert peer.associate() == PDU_ASSOCIATE_AC
        for pdu in _find_pdus(message_id=5):
            peer.send(pdu)
        pdu_type, body = peer.read_pdu()
        assert pdu_type == PDU_DATA
        rsp = _response(body)
        assert rsp.CommandField == 0x8020  # C-FIND-RSP
        assert rsp.MessageIDBeingRespondedTo == 5
        assert rsp.Status == 0x0211  # unrecognized operation
        # The association is still usable for what the node does serve.
        assert peer.store(dataset_bytes(path), ds.SOPInstanceUID) == 0x0000
    assert_logged(node, "REJECTED DIMSE request calling_ae=SENDER", "command_field=0x0020")
    assert [p.name for p in stored(dest)] == [f"CT_{ds.SOPInstanceUID}.dcm"]


def test_lean_non_dicom_application_context_is_rejected(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, _ = start(tmp_path, port, start_node, network=LEAN)
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.3.4.5"
    prim.calling_ae_title = "SENDER"
    prim.called_ae_title = "NODE"
    prim.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    prim.called_presentation_address = AddressInformation("127.0.0.1", 2)
    cx = build_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    prim.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    with RawPeer(port) as peer:
        peer.send(bytes(pdu.encode()))
        pdu_type, body = peer.read_pdu()
    assert pdu_type == PDU_ASSOCIATE_RJ
    assert tuple(body[1:4]) == (0x01, 0x01, 0x02)  # permanent, user: app context not supported
    assert_logged(node, "REJECTED association calling_ae=SENDER", "application context")


def test_lean_data_on_a_context_that_was_not_accepted_aborts_and_files_nothing(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    node, dest = start(tmp_path, port, start_node, network=LEAN)
    path, ds = ok_object(tmp_path, "wrong-context")
    pdus = store_pdus(dataset_bytes(path), ds.SOPInstanceUID)
    # P-DATA-TF: type, reserved, 4-byte length, then the PDV: 4-byte length, context id.
    forged = pdus[0][:10] + bytes([99]) + pdus[0][11:]
    with RawPeer(port) as peer:
        assert peer.associate() == PDU_ASSOCIATE_AC
        peer.send(forged)
        pdu_type, _ = peer.read_pdu()
    assert pdu_type in (None, 0x07)  # A-ABORT (or closed), never a response
    assert_logged(node, "ABORTED association calling_ae=SENDER", "presentation context 99")
    assert echoscu(port)
    assert stored(dest) == []


def test_lean_file_meta_names_the_node_and_the_sender_bytes_untouched(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    _, dest = start(tmp_path, port, start_node, network=LEAN)
    path, ds = ok_object(tmp_path, "meta")
    done = storescu(port, [path])
    assert done.returncode == 0, done.stderr
    [filed] = stored(dest)
    meta = pydicom.dcmread(filed, stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_UID
    assert meta.SourceApplicationEntityTitle == "SENDER"
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    (group_length,) = struct.unpack("<I", filed.read_bytes()[140:144])
    assert group_length == len(filed.read_bytes()) - 144 - len(dataset_bytes(filed))
    assert dataset_bytes(filed) == dataset_bytes(path)


def test_lean_temp_folder_is_empty_once_no_association_is_served(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    """Temp files made ahead for the next object are deleted when the node goes idle."""
    _, dest = start(tmp_path, port, start_node, network=LEAN)
    files = [ok_object(tmp_path, f"o{i}", instance=i)[0] for i in range(6)]
    done = storescu(port, files)
    assert done.returncode == 0, done.stderr
    assert len(stored(dest)) == 6
    temp = dest / ".incoming-tmp"
    # Only the receive journal's folder stays (it holds no temp file).
    assert wait_until(lambda: not any(p.is_file() for p in temp.iterdir()), 10), list(
        temp.iterdir()
    )


def test_lean_association_makes_its_next_temp_file_after_each_response(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    """One empty temp file waits for an open association's next C-STORE, made after the response.

    Made on the association's own thread once the peer has its answer (no thread
    creating files beside renames, nothing on the response path); used by the
    next object, deleted when the association ends.
    """
    from pynetdicom import AE

    _, dest = start(tmp_path, port, start_node, network=LEAN)
    files = [ok_object(tmp_path, f"s{i}", instance=i) for i in range(3)]
    temp = dest / ".incoming-tmp"
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(files[0][1].SOPClassUID, files[0][1].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
    assert assoc.is_established
    try:
        assert not [p for p in temp.iterdir() if p.is_file()]  # none before the first object
        for path, _ in files:
            assert int(assoc.send_c_store(path).Status) == 0
            # The response comes before the spare: wait for it, then expect exactly one.
            assert wait_until(lambda: any(p.is_file() for p in temp.iterdir()), 10)
            spares = [p for p in temp.iterdir() if p.is_file()]
            assert len(spares) == 1, spares
            assert spares[0].stat().st_size == 0
    finally:
        assoc.release()
    assert len(stored(dest)) == 3
    assert wait_until(lambda: not any(p.is_file() for p in temp.iterdir()), 10), list(
        temp.iterdir()
    )


def test_receiver_retired_pynetdicom_transport_is_logged_and_stores(
    tmp_path: Path, port: int, start_node: StartNode
) -> None:
    network = {"receiver_transport": "pynetdicom", "receiver_processes": 1}
    node, dest = start(tmp_path, port, start_node, network=network)
    path, ds = ok_object(tmp_path, "pyn")
    done = storescu(port, [path])
    assert done.returncode == 0, done.stderr
    assert [p.name for p in stored(dest)] == [f"CT_{ds.SOPInstanceUID}.dcm"]
    assert_logged(node, "DEPRECATED [Network] receiver_transport = pynetdicom")


@pytest.mark.parametrize("what", ["instance", "class"])
def test_lean_command_uid_differing_from_data_set_gets_a900_and_errors_entry(
    tmp_path: Path, port: int, start_node: StartNode, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """pynetdicom sends a file's UIDs from its File Meta: a meta contradicting the data set."""
    from pynetdicom import AE, _config

    node, dest = start(tmp_path, port, start_node, network=LEAN)
    path, ds = ok_object(tmp_path, "mismatch")
    good, _ = ok_object(tmp_path, "good", instance=2)
    if what == "instance":
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    else:
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR, data set is CT
    ds.preamble = b"\0" * 128
    ds.save_as(path)  # the File Meta as set here (pydicom would otherwise correct it)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="NODE")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(f).Status) for f in (path, good)]
    finally:
        assoc.release()
    assert statuses == [0xA900, 0x0000]
    assert [path_uid(p) for p in stored(dest)] == [pydicom.dcmread(good).SOPInstanceUID]
    [note] = errors_entries(dest)
    assert "differs from the data set's SOP" in note.read_text()
    kept = pydicom.dcmread(note.with_suffix(".dcm"))
    assert (kept.SOPInstanceUID, kept.SOPClassUID) == (ds.SOPInstanceUID, ds.SOPClassUID)
    assert_logged(node, "STORE-FAILED calling_ae=SENDER", "status=0xA900")

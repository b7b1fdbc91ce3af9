"""A raw-socket DICOM peer for hardening tests, plus small shared checks.

DCMTK and pynetdicom refuse to send malformed objects or to stop half-way
through a PDU; this peer encodes PDUs with pynetdicom's own encoders and writes
whatever bytes a test asks for, so tests can truncate, stall and garble at will.
Also: the data set bytes of a Part 10 file, a tmpfs fixture helper and the
"nothing half-written is visible" scan used by several suites.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation

from tests.conftest import IN_CI, files_below

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PDU_ASSOCIATE_AC = 0x02
PDU_ASSOCIATE_RJ = 0x03
PDU_DATA = 0x04
PDU_ABORT = 0x07


def encode_dataset(ds: Dataset, implicit: bool = False) -> bytes:
    """Return ``ds`` encoded as a bare little endian data set (no preamble, no meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return bytes(fp.getvalue())


def dataset_bytes(path: Path) -> bytes:
    """Return the bytes after the file meta group of a Part 10 file."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a Part 10 file"
    (meta_len,) = struct.unpack("<L", data[140:144])
    return data[144 + meta_len :]


def associate_rq(
    calling: str,
    called: str,
    abstract_syntaxes: list[str],
    transfer_syntax: str = EXPLICIT_LE,
    max_pdu: int = 16384,
) -> bytes:
    """Return an encoded A-ASSOCIATE-RQ PDU (one presentation context per abstract syntax)."""
    contexts = [
        (2 * i + 1, abstract, [transfer_syntax]) for i, abstract in enumerate(abstract_syntaxes)
    ]
    return associate_rq_contexts(calling, called, contexts, max_pdu)


def associate_rq_contexts(
    calling: str,
    called: str,
    contexts: list[tuple[int, str, list[str]]],
    max_pdu: int = 16384,
) -> bytes:
    """Return an A-ASSOCIATE-RQ PDU encoded by pynetdicom; contexts are (id, abstract, syntaxes)."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    prim.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    prim.called_presentation_address = AddressInformation("127.0.0.1", 2)
    built = []
    for context_id, abstract, syntaxes in contexts:
        cx = build_context(abstract, syntaxes)
        cx.context_id = context_id
        built.append(cx)
    prim.presentation_context_definition_list = built
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.8.498.1"
    prim.user_information = [max_length, impl]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def store_pdus(
    data: bytes, sop_uid: str, sop_class: str = CT_STORAGE, message_id: int = 1
) -> list[bytes]:
    """Return the P-DATA-TF PDUs of a C-STORE-RQ carrying ``data`` as its data set."""
    prim = C_STORE()
    prim.MessageID = message_id
    prim.AffectedSOPClassUID = sop_class
    prim.AffectedSOPInstanceUID = sop_uid
    prim.Priority = 2
    prim.DataSet = BytesIO(data)
    msg = C_STORE_RQ()
    msg.primitive_to_message(prim)
    return message_pdus(msg)


def message_pdus(msg: Any, context_id: int = 1, max_pdu: int = 16384) -> list[bytes]:
    """Return the P-DATA-TF PDUs pynetdicom encodes for a DIMSE message."""
    out = []
    for p_data in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out.append(bytes(pdu.encode()))
    return out


class RawPeer:
    """One TCP connection to the node, driven PDU by PDU."""

    def __init__(self, port: int, timeout_s: float = 20.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (no release)."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Write raw bytes."""
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int | None, bytes]:
        """Return (PDU type, body); type None when the node closed the connection."""
        head = self._read_exact(6)
        if len(head) < 6:
            return None, b""
        pdu_type, _, length = struct.unpack(">BBL", head)
        return pdu_type, self._read_exact(length)

    def _read_exact(self, n: int) -> bytes:
        chunks = b""
        while len(chunks) < n:
            try:
                got = self.sock.recv(n - len(chunks))
            except ConnectionResetError:
                return chunks
            if not got:
                break
            chunks += got
        return chunks

    def associate(
        self, calling: str = "SENDER", called: str = "NODE", abstract: str = CT_STORAGE
    ) -> int | None:
        """Send an A-ASSOCIATE-RQ; return the type of the answer PDU."""
        self.send(associate_rq(calling, called, [abstract]))
        pdu_type, _ = self.read_pdu()
        return pdu_type

    def store(self, data: bytes, sop_uid: str, sop_class: str = CT_STORAGE) -> int:
        """Send one C-STORE with ``data`` as data set; return its response status."""
        for pdu in store_pdus(data, sop_uid, sop_class):
            self.send(pdu)
        pdu_type, body = self.read_pdu()
        assert pdu_type == PDU_DATA, f"expected a C-STORE-RSP, got PDU type {pdu_type}"
        return response_status(body)


def response_status(body: bytes) -> int:
    """Return the Status of the command set in a one-PDV P-DATA-TF body."""
    # PDV item: 4-byte length, context ID, message control header, fragment.
    command = decode(BytesIO(body[6:]), True, True)
    return int(command.Status)


def acknowledged_by_storescu(log: str, files: list[Path]) -> set[Path]:
    """Return the files storescu -v reports as answered with Success or Warning."""
    acked: set[Path] = set()
    current: Path | None = None
    by_name = {str(f): f for f in files}
    for line in log.splitlines():
        if line.startswith("I: Sending file: "):
            current = by_name.get(line.removeprefix("I: Sending file: ").strip())
        elif line.startswith("I: Received Store Response (") and current is not None:
            status = line.removeprefix("I: Received Store Response (")
            if status.startswith(("Success", "Warning")):
                acked.add(current)
            current = None
    return acked


def visible_files(root: Path) -> list[Path]:
    """Return every file below ``root`` except the receiver's hidden temp folder and the ledger."""
    return [
        p
        for p in files_below(root)
        if not {".incoming-tmp", ".ledger"} & set(p.relative_to(root).parts)
    ]


def assert_nothing_half_written(root: Path) -> None:
    """Fail when a file below ``root`` carries an in-progress name or is not a whole object.

    ``errors/`` is skipped: it holds what could not be stored, by design.
    """
    from dicomnode.integrity import find_defect

    for path in visible_files(root):
        if path.relative_to(root).parts[0] == "errors":
            continue
        assert not path.name.endswith(".part"), f"in-progress file visible: {path}"
        if path.suffix == ".dcm":
            defect = find_defect(path)
            assert defect is None, f"incomplete object under a final name: {path}: {defect}"


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``folder``; skip locally (fail under CI) if impossible."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    try:
        yield folder
    finally:
        done = subprocess.run(["umount", str(folder)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)

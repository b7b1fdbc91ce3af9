"""The forwarder sends each file in its own transfer syntax when the target supports it (no re-encode)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian

from dicomnode.forwarder import send_paths
from tests.factories import make_image, save
from tests.integration.test_forward import TARGET_AET, StoreSCP, fconfig

pytestmark = pytest.mark.interop


def dataset_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


def test_forward_implicit_vr_file_is_sent_unconverted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="dicomnode")
    scp = StoreSCP(tmp_path).start()
    try:
        ds = make_image("CT")
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        src = save(ds, tmp_path / "send" / "PAT" / "ct.dcm")
        original = dataset_bytes(src)
        cfg = fconfig(tmp_path, scp.port)
        assert cfg.target_aet == TARGET_AET
        assert send_paths([tmp_path / "send"], cfg, progress=False) == 0
        [received] = [p for p in scp.out.rglob("*") if p.is_file()]
    finally:
        scp.stop()
    # DCMTK storescp prefers Explicit VR; offered Implicit VR in a context of its own it keeps it.
    assert dcmread(received).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert dataset_bytes(received) == original
    assert "CONVERTED" not in caplog.text

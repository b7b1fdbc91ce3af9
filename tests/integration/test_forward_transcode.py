"""Forwarding files in every transfer syntax to real targets (issue 12).

Files are made in the test by DCMTK (``dcmconv +tb/+td``, ``dcmcrle``,
``dcmcjpeg``, ``dcmcjpls``) and GDCM (``gdcmconv --j2k``, where installed), plus
pydicom's ``image_dfl.dcm``. Each is forwarded

* to a target that accepts its transfer syntax (DCMTK ``storescp +xa +B``, which
  writes the data set exactly as received): the stored bytes equal the source's
  (a deflated data set of odd length gains the trailing NULL of PS3.5 A.5);
* to targets that accept only uncompressed little endian (``storescp +xi``,
  a pynetdicom SCP): the stored pixel values equal those of DCMTK's own
  decompression (``dcmdjpeg``, ``dcmdjpls``, ``dcmdrle``, ``dcmconv +te``;
  ``gdcmconv --raw`` for JPEG 2000), the SOP Instance UID is kept and
  decompressed lossy JPEG says Lossy Image Compression = 01;
* to Orthanc, which must store every one of them.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomnode.forwarder import Forwarder, send_paths
from tests.conftest import IN_CI, require_tool, wait_until
from tests.factories import ROOT, make_image, save
from tests.integration.test_forward import (
    PySCP,
    StoreSCP,
    error_log,
    fconfig,
    files_in,
    orthanc_target,
    start_forwarder,
)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning"),
    # pydicom's JPEG-LS decoder warns when near-lossless data happens to be as large as raw
    pytest.mark.filterwarnings("ignore:The number of bytes of compressed pixel data:UserWarning"),
]


# --------------------------------------------------------------------------- test files


def data_set_bytes(path: Path) -> bytes:
    """Return the data set of a Part 10 file (after its File Meta Information)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length :]


def base_image(kind: str) -> Dataset:
    """A small image: ``ct`` 16-bit signed, ``mr8`` 8-bit, ``rgb`` 8-bit colour."""
    rng = np.random.default_rng(12)
    if kind == "ct":
        ds = make_image("CT", rows=24, cols=20)
        ds.PixelRepresentation = 1
        ds.BitsStored, ds.HighBit = 16, 15
        values = rng.integers(-1024, 3000, (24, 20), dtype=np.int16)
        values[0, :4] = [175, -20736, -1, 0]  # 175 byte-swapped is -20736
        ds.PixelData = values.tobytes()
        return ds
    if kind == "ct12":
        ds = make_image("CT", rows=24, cols=20)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = rng.integers(0, 4096, (24, 20), dtype=np.uint16).tobytes()
        return ds
    ds = make_image("MR", rows=21, cols=19)  # odd sizes: odd pixel data length for 8 bits
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    if kind == "mr8":
        ds.PixelData = rng.integers(0, 256, (21, 19), dtype=np.uint8).tobytes() + b"\0"
        return ds
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    gradient = np.linspace(0, 255, 21 * 19 * 3).astype(np.uint8).reshape(21, 19, 3)
    ds.PixelData = gradient.tobytes() + b"\0"
    return ds


@dataclass(frozen=True)
class Variant:
    """One test file: name, the tool command that made it, and DCMTK's uncompressed reference."""

    name: str
    path: Path
    reference: Path
    lossy: bool


#: name -> (base image, command making it from the base, command making the reference)
_RECIPES: dict[str, tuple[str, list[str], list[str]]] = {
    "be_ct": ("ct", ["dcmconv", "+tb"], ["dcmconv", "+te"]),
    "be_mr8": ("mr8", ["dcmconv", "+tb"], ["dcmconv", "+te"]),
    "be_rgb": ("rgb", ["dcmconv", "+tb"], ["dcmconv", "+te"]),
    "deflate_ct": ("ct", ["dcmconv", "+td"], ["dcmconv", "+te"]),
    "deflate_mr8": ("mr8", ["dcmconv", "+td"], ["dcmconv", "+te"]),
    "rle_ct": ("ct", ["dcmcrle"], ["dcmdrle"]),
    "rle_rgb": ("rgb", ["dcmcrle"], ["dcmdrle"]),
    "jpeg_lossless_ct": ("ct", ["dcmcjpeg", "+e1"], ["dcmdjpeg"]),
    "jpeg_lossless_rgb": ("rgb", ["dcmcjpeg", "+el"], ["dcmdjpeg"]),
    "jpeg_baseline_mr8": ("mr8", ["dcmcjpeg", "+eb"], ["dcmdjpeg"]),
    "jpeg_baseline_rgb": ("rgb", ["dcmcjpeg", "+eb"], ["dcmdjpeg"]),
    "jpeg_extended_mr8": ("mr8", ["dcmcjpeg", "+ee"], ["dcmdjpeg"]),
    "jpeg_extended_ct12": ("ct12", ["dcmcjpeg", "+ee"], ["dcmdjpeg"]),
    "jpegls_ct": ("ct", ["dcmcjpls", "+el"], ["dcmdjpls"]),
    "jpegls_near_mr8": ("mr8", ["dcmcjpls", "+en"], ["dcmdjpls"]),
    "j2k_ct": ("ct", ["gdcmconv", "--j2k"], ["gdcmconv", "--raw"]),
    "j2k_rgb": ("rgb", ["gdcmconv", "--j2k"], ["gdcmconv", "--raw"]),
}
_LOSSY = {
    "jpeg_baseline_mr8",
    "jpeg_baseline_rgb",
    "jpeg_extended_mr8",
    "jpeg_extended_ct12",
    "jpegls_near_mr8",
    "pydicom_JPEG-lossy",
    "pydicom_SC_rgb_jpeg_dcmtk",
}
#: pydicom's own test files (third-party encoders) -> DCMTK command making the reference
_THIRD_PARTY: dict[str, list[str]] = {
    "image_dfl": ["dcmconv", "+te"],  # deflated, odd length
    "MR_small_bigendian": ["dcmconv", "+te"],
    "JPEG-lossy": ["dcmdjpeg"],  # 12-bit JPEG Extended
    "SC_rgb_jpeg_dcmtk": ["dcmdjpeg"],  # YBR_FULL_422 baseline
}


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Variant]:
    """Every test file, each with its own SOP Instance UID, plus pydicom's image_dfl.dcm."""
    for tool in ("dcmconv", "dcmcrle", "dcmdrle", "dcmcjpeg", "dcmdjpeg", "dcmcjpls", "dcmdjpls"):
        require_tool(tool)
    folder = tmp_path_factory.mktemp("variants")
    made: dict[str, Variant] = {}
    for name, (kind, make, decode) in _RECIPES.items():
        if make[0] == "gdcmconv" and not _have("gdcmconv") and not IN_CI:
            continue  # GDCM is optional where not installed
        base = base_image(kind)
        base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = generate_uid(ROOT)
        path, reference = folder / f"{name}.dcm", folder / f"{name}.ref.dcm"
        for extra in range(20):  # deflated: vary a comment until the stream has an odd length
            base.ImageComments = "x" * 2 * extra
            source = save(base, folder / f"{name}.base.dcm")
            subprocess.run([*make, str(source), str(path)], check=True, capture_output=True)
            if not name.startswith("deflate") or len(data_set_bytes(path)) % 2:
                break
        subprocess.run([*decode, str(path), str(reference)], check=True, capture_output=True)
        made[name] = Variant(name, path, reference, name in _LOSSY)
    for stem, decode in _THIRD_PARTY.items():
        name = f"pydicom_{stem}"
        path = Path(str(get_testdata_file(f"{stem}.dcm")))
        reference = folder / f"{name}.ref.dcm"
        subprocess.run([*decode, str(path), str(reference)], check=True, capture_output=True)
        made[name] = Variant(name, path, reference, name in _LOSSY)
    return made


def copy_into(variants: dict[str, Variant], folder: Path) -> dict[str, str]:
    """Copy every variant into ``folder``; return {SOP Instance UID: variant name}."""
    folder.mkdir(parents=True, exist_ok=True)
    by_uid: dict[str, str] = {}
    for v in variants.values():
        shutil.copyfile(v.path, folder / f"{v.name}.dcm")
        by_uid[str(dcmread(v.path, stop_before_pixels=True).SOPInstanceUID)] = v.name
    assert len(by_uid) == len(variants)
    return by_uid


def odd_deflated(variants: dict[str, Variant]) -> list[str]:
    return [
        v.name
        for v in variants.values()
        if dcmread(v.path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        == DeflatedExplicitVRLittleEndian
        and len(data_set_bytes(v.path)) % 2
    ]


def assert_pixels_equal(got: Dataset, variant: Variant) -> None:
    reference = dcmread(variant.reference)
    expected, actual = reference.pixel_array, got.pixel_array
    assert actual.shape == expected.shape, variant.name
    assert np.array_equal(actual, expected), (
        f"{variant.name}: max difference "
        f"{np.abs(actual.astype(np.int64) - expected.astype(np.int64)).max()}"
    )
    assert got.PhotometricInterpretation == reference.PhotometricInterpretation, variant.name


# --------------------------------------------------------------------------- targets


class _StoreSCP(StoreSCP):
    def __init__(self, tmp: Path, *args: str) -> None:
        super().__init__(tmp)
        self.extra_args = list(args)


def test_forward_each_syntax_unchanged_to_a_target_that_accepts_it(
    tmp_path: Path, variants: dict[str, Variant], caplog: pytest.LogCaptureFixture
) -> None:
    """storescp +xa +B accepts every syntax and stores the data set as received."""
    caplog.set_level("INFO", logger="dicomnode")
    assert {"deflate_ct", "deflate_mr8", "pydicom_image_dfl"} <= set(odd_deflated(variants))
    scp = _StoreSCP(tmp_path, "+xa", "+B").start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        by_uid = copy_into(variants, tmp_path / "send" / "ALL")
        assert send_paths([tmp_path / "send" / "ALL"], cfg, progress=False) == 0, caplog.text
        received = {
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files_in(scp.out)
        }
    finally:
        scp.stop()
    assert set(received) == set(by_uid)
    converted = set()
    for uid, name in by_uid.items():
        syntax = dcmread(variants[name].path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        if dcmread(received[uid], stop_before_pixels=True).file_meta.TransferSyntaxUID != syntax:
            converted.add(name)  # not among storescp's syntaxes: converted, pixels exact
            assert_pixels_equal(dcmread(received[uid]), variants[name])
            continue
        source = data_set_bytes(variants[name].path)
        if len(source) % 2:  # deflated: one trailing NULL byte (PS3.5 A.5)
            source += b"\0"
        assert data_set_bytes(received[uid]) == source, name
    # DCMTK 3.6 does not negotiate JPEG Lossless process 14 with other predictors (.57)
    assert converted <= {"jpeg_lossless_rgb"}
    assert caplog.text.count("CONVERTED") == len(converted)


def test_forward_each_syntax_converted_for_a_target_taking_only_implicit_vr(
    tmp_path: Path, variants: dict[str, Variant], caplog: pytest.LogCaptureFixture
) -> None:
    """storescp +xi accepts Implicit VR Little Endian only: every file is converted, pixels exact."""
    caplog.set_level("INFO", logger="dicomnode")
    scp = _StoreSCP(tmp_path, "+xi").start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        by_uid = copy_into(variants, tmp_path / "send" / "ALL")
        assert send_paths([tmp_path / "send" / "ALL"], cfg, progress=False) == 0, caplog.text
        received = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in files_in(scp.out)}
    finally:
        scp.stop()
    assert set(received) == set(by_uid)  # every object arrived, each under its own UID
    for uid, name in by_uid.items():
        ds = received[uid]
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert_pixels_equal(ds, variants[name])
        assert (ds.get("LossyImageCompression") == "01") == variants[name].lossy, name
    assert caplog.text.count("CONVERTED") == len(by_uid)
    assert "LossyImageCompression=01" in caplog.text


def test_forward_each_syntax_converted_for_pynetdicom_explicit_little_endian(
    tmp_path: Path, variants: dict[str, Variant]
) -> None:
    """A pynetdicom SCP with Explicit/Implicit VR Little Endian: converted to Explicit VR LE."""
    scp = PySCP([CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage]).start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        by_uid = copy_into(variants, tmp_path / "send" / "ALL")
        assert send_paths([tmp_path / "send" / "ALL"], cfg, progress=False) == 0
    finally:
        scp.stop()
    received = {str(ds.SOPInstanceUID): ds for ds in scp.received}
    assert set(received) == set(by_uid)
    for uid, name in by_uid.items():
        ds = received[uid]
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert_pixels_equal(ds, variants[name])


def test_forward_every_syntax_stored_by_orthanc(
    tmp_path: Path, variants: dict[str, Variant], forwarders: list[Forwarder]
) -> None:
    orthanc = orthanc_target(tmp_path)
    try:
        cfg = fconfig(tmp_path, orthanc.dicom_port)
        by_uid = copy_into(variants, cfg.watch_folder / "ALL")
        start_forwarder(forwarders, cfg)
        assert wait_until(lambda: not (cfg.watch_folder / "ALL").exists(), 60), error_log(cfg)
        assert orthanc.sop_instance_uids() == set(by_uid)
    finally:
        orthanc.stop()
    assert not error_log(cfg)


def test_forward_unconvertible_object_is_parked_with_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A JPEG whose code stream cannot be decoded is parked, never sent undecoded."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    caplog.set_level("INFO", logger="dicomnode")
    scp = _StoreSCP(tmp_path, "+xi").start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        bad = make_image("CT", instance=1)
        bad.PixelData = encapsulate([b"\xff\xd8\xff\xc3 broken \xff\xd9"])
        bad["PixelData"].VR = "OB"
        bad.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        save(bad, tmp_path / "send" / "G" / "bad.dcm")
        good = save(make_image("CT", instance=2), tmp_path / "send" / "G" / "good.dcm")
        assert send_paths([tmp_path / "send" / "G"], cfg, progress=False) == 1
        assert len(files_in(scp.out)) == 1
    finally:
        scp.stop()
    assert not good.exists()
    log = error_log(cfg)
    assert "bad.dcm" in log and "conversion from JPEG Lossless" in log
    assert "Implicit VR Little Endian" in log


# --------------------------------------------------------------------------- UIDs


def test_forward_sends_the_data_sets_uids_not_the_file_meta_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three objects whose File Meta all claim one SOP Instance UID all arrive at storescp +B.

    storescp +B names each file after the C-STORE's Affected SOP Instance UID;
    with the header's UID the three would overwrite one another.
    """
    caplog.set_level("INFO", logger="dicomnode")
    scp = _StoreSCP(tmp_path, "+B").start()
    shared = generate_uid(ROOT)
    try:
        cfg = fconfig(tmp_path, scp.port)
        uids = []
        for i in range(3):
            ds = make_image("CT", instance=i + 1)
            ds.file_meta.MediaStorageSOPInstanceUID = shared
            ds.preamble = b"\0" * 128
            path = tmp_path / "send" / "G" / f"{i}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=False)
            assert dcmread(path).file_meta.MediaStorageSOPInstanceUID == shared
            uids.append(str(ds.SOPInstanceUID))
        assert send_paths([tmp_path / "send" / "G"], cfg, progress=False) == 0
        received = sorted(str(dcmread(p).SOPInstanceUID) for p in files_in(scp.out))
    finally:
        scp.stop()
    assert received == sorted(uids)
    assert caplog.text.count("UID-MISMATCH") == 3
    assert shared in caplog.text


def test_forward_storescp_default_accepts_big_endian_as_is(
    tmp_path: Path, variants: dict[str, Variant]
) -> None:
    """DCMTK's default storescp accepts Explicit VR Big Endian: sent unconverted, values intact."""
    scp = _StoreSCP(tmp_path).start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        folder = tmp_path / "send" / "BE"
        folder.mkdir(parents=True)
        shutil.copyfile(variants["be_ct"].path, folder / "be.dcm")
        assert send_paths([folder], cfg, progress=False) == 0
        [received] = files_in(scp.out)
        assert_pixels_equal(dcmread(received), variants["be_ct"])
    finally:
        scp.stop()


def test_forward_bare_data_sets_and_32_bit_big_endian_dose(tmp_path: Path) -> None:
    """Files without File Meta Information are sent like storescu sends them; an RT Dose
    with 32-bit big endian pixels reaches a little-endian-only target with its dose values."""
    from pydicom.uid import RTDoseStorage, RTIonPlanStorage, RTStructureSetStorage

    names = ("rtstruct", "ExplVR_LitEndNoMeta", "ExplVR_BigEndNoMeta", "rtdose_expb")
    folder = tmp_path / "send" / "BARE"
    folder.mkdir(parents=True)
    for name in names:
        shutil.copyfile(str(get_testdata_file(f"{name}.dcm")), folder / f"{name}.dcm")
    scp = PySCP([RTDoseStorage, RTIonPlanStorage, RTStructureSetStorage]).start()
    try:
        cfg = fconfig(tmp_path, scp.port)
        assert send_paths([folder], cfg, progress=False) == 0, error_log(cfg)
    finally:
        scp.stop()
    received = {str(ds.SOPInstanceUID): ds for ds in scp.received}
    for name in names:
        source = dcmread(str(get_testdata_file(f"{name}.dcm")), force=True)
        assert str(source.SOPInstanceUID) in received, name
    dose = received[str(dcmread(str(get_testdata_file("rtdose_expb.dcm"))).SOPInstanceUID)]
    dose.file_meta = FileMetaDataset()
    dose.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    little = dcmread(str(get_testdata_file("rtdose.dcm")))  # the same dose, little endian
    assert np.array_equal(dose.pixel_array, little.pixel_array)

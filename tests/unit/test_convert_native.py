"""Native Enhanced MR -> classic MR conversion: validity (dciodvfy), geometry, pixels, UIDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, MRImageStorage, RLELossless

from dicomnode.convert.native import (
    ENHANCED_ONLY,
    classic_instance_number,
    convert_dataset,
    frame_uid,
    name_based_uid,
)
from dicomnode.errors import ConversionError
from tests.conftest import require_tool
from tests.enhanced_factory import (
    ENHANCED_MR_COLOR,
    FRAME_OF_REFERENCE_UID,
    ROOT,
    STUDY_UID,
    VENDOR_IPP_OFFSET,
    assert_valid_classic,
    frame_pixels,
    frame_positions,
    make_enhanced_ct,
    make_enhanced_mr,
    make_enhanced_pet,
    save,
)

VARIANTS = {
    "native-le": {"transfer_syntax": ExplicitVRLittleEndian},
    "native-be": {"transfer_syntax": ExplicitVRBigEndian},
    "rle": {"transfer_syntax": RLELossless},
    "vendor": {"vendor": True},
    "vendor-be": {"vendor": True, "transfer_syntax": ExplicitVRBigEndian},
    "inversion-recovery": {"inversion_recovery": True},
}


def _roundtrip(tmp_path: Path, name: str = "src", **kwargs: object) -> Dataset:
    """Write the fixture to disk and read it back, as the receiver would store it."""
    return dcmread(save(make_enhanced_mr(**kwargs), tmp_path / f"{name}.dcm"))  # type: ignore[arg-type]


def _save_all(out: list[Dataset], folder: Path) -> list[Path]:
    paths = []
    for i, ds in enumerate(out):
        path = folder / f"frame{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_convert_native_outputs_validate_with_dciodvfy(tmp_path: Path, variant: str) -> None:
    dciodvfy = require_tool("dciodvfy")
    out = convert_dataset(_roundtrip(tmp_path, **VARIANTS[variant]))
    assert len(out) == 4
    for path in _save_all(out, tmp_path):
        assert_valid_classic(dciodvfy, path, "MRImage")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_convert_native_geometry_equals_standard_per_frame_values(
    tmp_path: Path, variant: str
) -> None:
    src = _roundtrip(tmp_path, **VARIANTS[variant])
    out = convert_dataset(src)
    positions = frame_positions(4)
    for i, ds in enumerate(out):
        frame = src.PerFrameFunctionalGroupsSequence[i]
        shared = src.SharedFunctionalGroupsSequence[0]
        std_ipp = [float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert [float(x) for x in ds.ImagePositionPatient] == std_ipp == positions[i]
        assert [float(x) for x in ds.ImageOrientationPatient] == [
            float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient
        ]
        assert [float(x) for x in ds.PixelSpacing] == [0.9765625, 1.25]
        assert float(ds.SliceThickness) == 2.5
        assert float(ds.SliceLocation) == pytest.approx(positions[i][2])


def test_convert_native_ignores_disagreeing_private_functional_groups(tmp_path: Path) -> None:
    src = _roundtrip(tmp_path, vendor=True)
    private = src.PerFrameFunctionalGroupsSequence[0][0x2005140F].value[0]
    assert float(private.ImagePositionPatient[0]) == pytest.approx(-120.25 + VENDOR_IPP_OFFSET)
    out = convert_dataset(src)
    assert [float(x) for x in out[0].ImagePositionPatient] == frame_positions(4)[0]
    assert [float(x) for x in out[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert out[0].RescaleType == "US"  # not the private "normalized"
    assert float(out[0].RescaleSlope) == pytest.approx(2.1081807081807)  # not the private 2.108
    assert float(out[0].EchoTime) == pytest.approx(3.7)  # not the private 99
    # The UID comes from the top-level SOP Instance UID, not the private frame UID.
    assert out[0].SOPInstanceUID == frame_uid(src.SOPInstanceUID, 1)
    assert 0x2005140F not in out[0] and 0x2005140E not in out[0]


def test_convert_native_maps_vendor_quirks_to_valid_classic_values(tmp_path: Path) -> None:
    out = convert_dataset(_roundtrip(tmp_path, vendor=True))
    first, second = out[0], out[1]
    assert first.InPlanePhaseEncodingDirection == "COL"  # enhanced COLUMN is not classic
    assert list(first.AcquisitionMatrix) == [0, 256, 192, 0]
    assert "TriggerTime" not in first  # Type 2C: only with cardiac gating (CG/PPG)
    assert float(first.RescaleSlope) == pytest.approx(2.1081807081807)
    assert len(str(first.RescaleSlope)) <= 16
    assert first.RealWorldValueMappingSequence[0].RealWorldValueSlope == 2.108
    assert first.AcquisitionDate == "20260102"  # zero frame time: top-level fallback
    assert first.AcquisitionTime == "101010.000000"
    assert second.AcquisitionTime == "101110.500000"


def test_convert_native_trigger_time_with_cardiac_gating(tmp_path: Path) -> None:
    src = _roundtrip(tmp_path, vendor=True)
    src.CardiacSynchronizationTechnique = "PROSPECTIVE"
    src.CardiacSignalSource = "ECG"
    ds = convert_dataset(src)[0]
    assert "CG" in list(ds.ScanOptions)
    assert float(ds.TriggerTime) == 0.0


def test_convert_native_big_endian_values_survive_reencoding(tmp_path: Path) -> None:
    out = convert_dataset(_roundtrip(tmp_path, vendor=True, transfer_syntax=ExplicitVRBigEndian))
    written = dcmread(_save_all(out, tmp_path)[0])
    assert written.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert written.RealWorldValueMappingSequence[0].RealWorldValueSlope == 2.108
    assert written.RealWorldValueMappingSequence[0].RealWorldValueLastValueMapped == 4095
    assert written.DiffusionBValue == 0.0
    assert list(written.AcquisitionMatrix) == [0, 256, 192, 0]
    assert float(written.ImagingFrequency) == pytest.approx(127.7654321987)


@pytest.mark.parametrize("variant", ["native-le", "native-be", "vendor", "vendor-be"])
def test_convert_native_pixels_bit_exact(tmp_path: Path, variant: str) -> None:
    out = convert_dataset(_roundtrip(tmp_path, **VARIANTS[variant]))
    expected = frame_pixels(4, 8, 10)
    for i, ds in enumerate(out):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.PixelData == expected[i].astype("<u2").tobytes()
        written = dcmread(_save_all([ds], tmp_path)[0])
        assert np.array_equal(written.pixel_array, expected[i])


def test_convert_native_encapsulated_frames_are_copied_not_decoded(tmp_path: Path) -> None:
    src = _roundtrip(tmp_path, transfer_syntax=RLELossless)
    source_frames = list(generate_frames(src.PixelData, number_of_frames=4))
    out = convert_dataset(src)
    expected = frame_pixels(4, 8, 10)
    for i, ds in enumerate(out):
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        (fragment,) = list(generate_frames(ds.PixelData, number_of_frames=1))
        assert fragment == source_frames[i]
        written = dcmread(_save_all([ds], tmp_path)[0])
        assert np.array_equal(written.pixel_array, expected[i])


def test_convert_native_uids_deterministic_unique_and_emf2sf_compatible(tmp_path: Path) -> None:
    src = _roundtrip(tmp_path)
    first = convert_dataset(src)
    again = convert_dataset(_roundtrip(tmp_path, name="again"))
    uids = [ds.SOPInstanceUID for ds in first]
    assert uids == [ds.SOPInstanceUID for ds in again]
    assert len(set(uids)) == len(uids)
    # Value computed with java.util.UUID.nameUUIDFromBytes (dcm4che HashUIDMapper) on JDK 17.
    assert name_based_uid(ROOT + "4.1") == "2.25.131056912931847251471237172003040267004"
    assert uids[0] == "2.25.131056912931847251471237172003040267004.1"
    for ds in first:
        assert len(ds.SOPInstanceUID) <= 64
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == MRImageStorage
        assert ds.SeriesInstanceUID == name_based_uid(src.SeriesInstanceUID)
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert ds.StudyInstanceUID == STUDY_UID
        assert ds.FrameOfReferenceUID == FRAME_OF_REFERENCE_UID
    assert [ds.InstanceNumber for ds in first] == [10001, 10002, 10003, 10004]


def test_convert_native_instance_number_fits_is() -> None:
    assert classic_instance_number(1, 3) == 10003
    assert classic_instance_number(None, 7) == 7
    assert classic_instance_number(123456789, 2) == 2  # would exceed IS


def test_convert_native_populates_classic_mr_attributes(tmp_path: Path) -> None:
    ds = convert_dataset(_roundtrip(tmp_path))[1]
    assert float(ds.EchoTime) == pytest.approx(3.7)
    assert float(ds.RepetitionTime) == pytest.approx(8.123)
    assert float(ds.FlipAngle) == 8.0
    assert float(ds.ImagingFrequency) == pytest.approx(127.7654321987)
    assert ds.ImagedNucleus == "1H"
    assert ds.SequenceName == "T1_TFE"
    assert list(ds.ScanningSequence) == ["GR"] or ds.ScanningSequence == "GR"
    assert list(ds.SequenceVariant) == ["SK", "SP"]
    assert list(ds.ScanOptions) == ["PFP", "FS"]
    assert ds.MRAcquisitionType == "3D"
    assert ds.AcquisitionDate == "20260102"
    assert ds.AcquisitionTime == "101110.500000"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    assert list(ds.AcquisitionMatrix) == [256, 0, 0, 192]
    assert ds.ReceiveCoilName == "HEAD 32"
    assert "InversionTime" not in ds
    for elem in ds.iterall():
        if elem.VR == "DS" and elem.value not in (None, ""):
            values = elem.value if elem.VM > 1 else [elem.value]
            assert all(len(str(v)) <= 16 for v in values), elem
        assert elem.keyword not in ENHANCED_ONLY - {
            "SOPInstanceUID",
            "SOPClassUID",
            "InstanceNumber",
            "SeriesInstanceUID",
            "PixelData",
        }, elem.keyword


def test_convert_native_inversion_time_only_for_inversion_recovery(tmp_path: Path) -> None:
    ds = convert_dataset(_roundtrip(tmp_path, inversion_recovery=True))[0]
    assert "IR" in list(ds.ScanningSequence)
    assert float(ds.InversionTime) == 900.0


def test_convert_native_rejects_missing_geometry(tmp_path: Path) -> None:
    src = _roundtrip(tmp_path)
    del src.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    with pytest.raises(ConversionError, match=r"frame 3 .*ImagePositionPatient"):
        convert_dataset(src)


def test_convert_native_rejects_classes_without_classic_target(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no classic target"):
        convert_dataset(_roundtrip(tmp_path, sop_class=ENHANCED_MR_COLOR))


def test_convert_native_cancel_stops(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="cancelled"):
        convert_dataset(_roundtrip(tmp_path), cancel=lambda: True)


def test_convert_native_repoints_references_to_converted_frames(tmp_path: Path) -> None:
    src = _roundtrip(tmp_path)
    other = ROOT + "8.1"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ref.ReferencedSOPInstanceUID = other
    ref.ReferencedFrameNumber = [2, 3]
    derivation = Dataset()
    derivation.SourceImageSequence = [ref]
    derivation.DerivationDescription = "resampled"
    src.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence = [derivation]
    ds = convert_dataset(src)[0]
    assert [r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence] == [
        frame_uid(other, 2),
        frame_uid(other, 3),
    ]
    assert all(r.ReferencedSOPClassUID == MRImageStorage for r in ds.SourceImageSequence)
    assert "ReferencedFrameNumber" not in ds.SourceImageSequence[0]
    assert ds.DerivationDescription == "resampled"


def test_convert_native_enhanced_ct_becomes_valid_ct(tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    src = dcmread(save(make_enhanced_ct(), tmp_path / "ct.dcm"))
    out = convert_dataset(src)
    assert len(out) == 3
    expected = frame_pixels(3, 8, 10)
    for i, (ds, path) in enumerate(zip(out, _save_all(out, tmp_path), strict=True)):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert float(ds.RescaleSlope) == 1.0  # Type 1 in CT: kept even when identity
        assert float(ds.RescaleIntercept) == -1024.0
        assert float(ds.KVP) == 120.0
        assert ds.XRayTubeCurrent == 250
        assert [float(x) for x in ds.ImagePositionPatient] == frame_positions(3)[i]
        assert ds.PixelData == expected[i].tobytes()
        assert "ScanningSequence" not in ds
        assert_valid_classic(dciodvfy, path, "CTImage")


def test_convert_native_enhanced_pet_becomes_valid_pet(tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    out = convert_dataset(dcmread(save(make_enhanced_pet(), tmp_path / "pet.dcm")))
    assert len(out) == 3
    for i, (ds, path) in enumerate(zip(out, _save_all(out, tmp_path), strict=True)):
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.128"
        assert ds.Units == "BQML"
        assert list(ds.SeriesType) == ["STATIC", "IMAGE"]
        assert ds.DecayCorrection == "START"
        assert "DECY" in list(ds.CorrectedImage)
        assert ds.ImageIndex == i + 1
        assert float(ds.FrameReferenceTime) == pytest.approx(i * 1000 + 500)
        assert float(ds.DecayFactor) == pytest.approx(1.0234)
        assert "PatientPosition" not in ds  # excluded by the NM/PET Patient Orientation module
        assert ds.PatientGantryRelationshipCodeSequence[0].CodeValue == "102540008"
        assert [float(x) for x in ds.ImagePositionPatient] == frame_positions(3)[i]
        assert_valid_classic(dciodvfy, path, "PETImage")

"""Clean Enhanced MR (and CT) fixtures built in code: no patient data, no binaries in git.

``make_enhanced_mr`` returns a complete Enhanced MR Image with shared and per-frame
functional groups, several frames of distinct geometry and pixels, in a chosen
transfer syntax (native little/big endian, or RLE Lossless with one fragment per
frame). ``vendor=True`` adds Philips-style private functional groups whose values
(position, UID, rescale) disagree with the standard ones, which a converter must ignore.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    RLELossless,
)

ENHANCED_MR: UID = UID("1.2.840.10008.5.1.4.1.1.4.1")
ENHANCED_MR_COLOR: UID = UID("1.2.840.10008.5.1.4.1.1.4.3")
ENHANCED_CT: UID = UID("1.2.840.10008.5.1.4.1.1.2.1")
ROOT = "1.2.826.0.1.3680043.8.498.77."
STUDY_UID = ROOT + "1"
FRAME_OF_REFERENCE_UID = ROOT + "3"
#: Offset Philips' private Image Position (Patient) has from the standard one.
VENDOR_IPP_OFFSET = 0.707


def _item(**attrs: object) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _seq(**attrs: object) -> Sequence:
    return Sequence([_item(**attrs)])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def frame_positions(frames: int) -> list[list[float]]:
    """Return the standard Image Position (Patient) of each frame (axial stack, 2.5 mm apart)."""
    return [[-120.25, -95.5, round(-30.0 + 2.5 * i, 4)] for i in range(frames)]


def frame_pixels(frames: int, rows: int, cols: int) -> np.ndarray:
    """Return distinct uint16 pixels per frame (values also use the high byte)."""
    base = np.arange(rows * cols, dtype=np.uint32).reshape(rows, cols)
    stack = [((base * 37 + i * 1009) % 4096).astype(np.uint16) for i in range(frames)]
    return np.stack(stack)


def make_enhanced_mr(
    frames: int = 4,
    rows: int = 8,
    cols: int = 10,
    transfer_syntax: str = ExplicitVRLittleEndian,
    vendor: bool = False,
    inversion_recovery: bool = False,
    sop_uid: str = ROOT + "4.1",
    series_uid: str = ROOT + "2",
    sop_class: str = ENHANCED_MR,
) -> Dataset:
    """Return an Enhanced MR Image with full shared and per-frame functional groups.

    Parameters
    ----------
    frames, rows, cols : int
        Size of the multi-frame image.
    transfer_syntax : str
        Explicit VR Little Endian, Explicit VR Big Endian or RLE Lossless.
    vendor : bool
        Add Philips-style private functional groups with disagreeing values.
    inversion_recovery : bool
        Make it an inversion-recovery sequence (classic InversionTime required).
    sop_uid, series_uid, sop_class : str
        Identity of the object.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceCreationDate = "20260102"
    ds.InstanceCreationTime = "101500"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20260102"
    ds.SeriesDate = "20260102"
    ds.ContentDate = "20260102"
    ds.StudyTime = "100000"
    ds.SeriesTime = "101000"
    ds.ContentTime = "101500"
    ds.AcquisitionDateTime = "20260102101010.000000"
    ds.AccessionNumber = "ACC42"
    ds.Modality = "MR"
    ds.Manufacturer = "Synthetic Scanners"
    ds.ReferringPhysicianName = "REF^DOC"
    ds.StudyDescription = "Enhanced study"
    ds.SeriesDescription = "T1 3D"
    ds.ManufacturerModelName = "Model X"
    ds.PatientName = "ENHANCED^TEST"
    ds.PatientID = "ENH001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.DeviceSerialNumber = "SN123"
    ds.SoftwareVersions = "1.0"
    ds.PatientPosition = "HFS"
    ds.ContentQualification = "PRODUCT"
    ds.PulseSequenceName = "T1_TFE"
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "FAT"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = "3"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.AcquisitionDuration = 120.0
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "S1"
    ds.SeriesNumber = 301
    ds.AcquisitionNumber = 3
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
    ds.PositionReferenceIndicator = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionContextSequence = Sequence([])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0

    dim_uid = ROOT + "5"
    ds.DimensionOrganizationSequence = _seq(DimensionOrganizationUID=dim_uid)
    ds.DimensionIndexSequence = Sequence(
        [
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00209056,
                FunctionalGroupPointer=0x00209111,
            ),
            _item(
                DimensionOrganizationUID=dim_uid,
                DimensionIndexPointer=0x00209057,
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )

    shared = Dataset()
    shared.PixelMeasuresSequence = _seq(PixelSpacing=[0.9765625, 1.25], SliceThickness=2.5)
    shared.PlaneOrientationSequence = _seq(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    shared.MRTimingAndRelatedParametersSequence = _seq(
        RepetitionTime=8.123,
        FlipAngle=8.0,
        EchoTrainLength=1,
        RFEchoTrainLength=1,
        GradientEchoTrainLength=1,
        SpecificAbsorptionRateSequence=Sequence(
            [
                _item(
                    SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                    SpecificAbsorptionRateValue=0.123456789,
                )
            ]
        ),
        GradientOutputType="DB_DT",
        GradientOutput=45.5,
        OperatingModeSequence=Sequence(
            [_item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")]
        ),
    )
    shared.MRFOVGeometrySequence = _seq(
        InPlanePhaseEncodingDirection="ROW",
        MRAcquisitionFrequencyEncodingSteps=256,
        MRAcquisitionPhaseEncodingStepsInPlane=192,
        MRAcquisitionPhaseEncodingStepsOutOfPlane=100,
        PercentSampling=75.0,
        PercentPhaseFieldOfView=100.0,
    )
    shared.MREchoSequence = _seq(EffectiveEchoTime=3.7000000000000002)
    shared.MRModifierSequence = _seq(
        InversionRecovery="YES" if inversion_recovery else "NO",
        FlowCompensation="NONE",
        Spoiling="RF",
        SpectrallySelectedExcitation="NONE",
        T2Preparation="NO",
        SpatialPresaturation="NONE",
        PartialFourier="YES",
        PartialFourierDirection="PHASE",
        ParallelAcquisition="YES",
        ParallelAcquisitionTechnique="SENSE",
        ParallelReductionFactorInPlane=2.0,
        ParallelReductionFactorOutOfPlane=1.0,
        ParallelReductionFactorSecondInPlane=1.0,
        **({"InversionTimes": [900.0]} if inversion_recovery else {}),
    )
    shared.MRImagingModifierSequence = _seq(
        MagnetizationTransfer="NONE",
        BloodSignalNulling="NO",
        Tagging="NONE",
        TransmitterFrequency=127.7654321987,
        PixelBandwidth=241.0,
    )
    shared.MRReceiveCoilSequence = _seq(
        ReceiveCoilName="HEAD 32",
        ReceiveCoilManufacturerName="Synthetic",
        ReceiveCoilType="MULTICOIL",
        QuadratureReceiveCoil="NO",
        MultiCoilDefinitionSequence=Sequence(
            [_item(MultiCoilElementName="H1", MultiCoilElementUsed="YES")]
        ),
    )
    shared.MRTransmitCoilSequence = _seq(
        TransmitCoilName="BODY",
        TransmitCoilManufacturerName="Synthetic",
        TransmitCoilType="BODY",
    )
    shared.MRAveragesSequence = _seq(NumberOfAverages=1.0)
    shared.FrameAnatomySequence = _seq(
        AnatomicRegionSequence=Sequence([_code("12738006", "SCT", "Brain")]),
        FrameLaterality="U",
    )
    shared.PixelValueTransformationSequence = _seq(
        RescaleIntercept=0, RescaleSlope=1, RescaleType="US"
    )
    shared.FrameVOILUTSequence = _seq(WindowCenter=600, WindowWidth=1200)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    if vendor:
        # Philips-like quirks: COLUMN phase direction, per-frame non-identity rescale,
        # real-world value mapping, cardiac group without gating, zero frame times.
        shared.MRFOVGeometrySequence[0].InPlanePhaseEncodingDirection = "COLUMN"
        del shared.PixelValueTransformationSequence
        ds.add_new(0x20050010, "LO", "Philips MR Imaging DD 001")
        ds.add_new(0x20051020, "SL", 1)
        shared.add_new(0x20050014, "LO", "Philips MR Imaging DD 005")
        shared.add_new(
            0x2005140E,
            "SQ",
            Sequence(
                [
                    _item(
                        PixelSpacing=[9.0, 9.0],
                        ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
                        EchoTime=99,
                    )
                ]
            ),
        )

    positions = frame_positions(frames)
    per_frame = []
    for i in range(frames):
        item = Dataset()
        item.FrameContentSequence = _seq(
            FrameAcquisitionNumber=3,
            FrameReferenceDateTime=f"20260102101010.{i:06d}",
            FrameAcquisitionDateTime=f"20260102101{i % 10}10.500000",
            FrameAcquisitionDuration=500.0,
            StackID="1",
            InStackPositionNumber=i + 1,
            DimensionIndexValues=[1, i + 1],
        )
        item.PlanePositionSequence = _seq(ImagePositionPatient=positions[i])
        item.MRImageFrameTypeSequence = _seq(
            FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"],
            PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE",
            ComplexImageComponent="MAGNITUDE",
            AcquisitionContrast="T1",
        )
        if vendor:
            item.PixelValueTransformationSequence = _seq(
                RescaleIntercept=0, RescaleSlope=2.10818070818070, RescaleType="US"
            )
            item.RealWorldValueMappingSequence = _seq(
                LUTExplanation="normalized",
                LUTLabel="Philips",
                MeasurementUnitsCodeSequence=Sequence([_code("1", "UCUM", "no units")]),
                RealWorldValueIntercept=0.0,
                RealWorldValueSlope=2.108,
                RealWorldValueFirstValueMapped=0,
                RealWorldValueLastValueMapped=4095,
            )
            item.CardiacSynchronizationSequence = _seq(
                NominalCardiacTriggerDelayTime=0.0, RRIntervalTimeNominal=1000.0
            )
            item.MRDiffusionSequence = _seq(DiffusionBValue=0.0, DiffusionDirectionality="NONE")
            if i == 0:
                content = item.FrameContentSequence[0]
                del content.FrameAcquisitionDateTime
                with config.disable_value_validation():  # deliberately invalid, like vendors
                    content.add_new(0x00189074, "DT", "00000000000000")
            item.add_new(0x20050014, "LO", "Philips MR Imaging DD 005")
            wrong = [p + VENDOR_IPP_OFFSET for p in positions[i]]
            item.add_new(
                0x2005140F,
                "SQ",
                Sequence(
                    [
                        _item(
                            ImagePositionPatient=wrong,
                            SOPInstanceUID=f"{ROOT}99.{i + 1}",
                            InstanceNumber=i + 1,
                            RescaleType="normalized",
                            RescaleSlope=2.108,
                        )
                    ]
                ),
            )
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)

    pixels = frame_pixels(frames, rows, cols)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if transfer_syntax == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = pixels.tobytes()
        ds.compress(RLELossless, pixels, encoding_plugin="pydicom", generate_instance_uid=False)
    elif transfer_syntax == ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = pixels.astype(">u2").tobytes()
    else:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        ds.PixelData = pixels.tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` in DICOM file format (its file meta transfer syntax) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=False)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


#: dciodvfy warnings that are legal for a converted classic image (see enhanced_mr.md §4).
DCIODVFY_ALLOWED_WARNINGS = (
    "Attribute is not present in standard DICOM IOD",
    "Dicom dataset contains attributes not present in standard DICOM IOD",
    "Unrecognized defined term",
    "Retired Person Name form",
    "CodingSchemeDesignator is deprecated",
    "Non-identity Modality LUT Module",
)


def run_dciodvfy(dciodvfy: str, path: Path) -> tuple[int, list[str]]:
    """Run dciodvfy on ``path``; return its exit code and output lines (it writes to stderr)."""
    import subprocess

    proc = subprocess.run(
        [dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    return proc.returncode, lines


def assert_valid_classic(dciodvfy: str, path: Path, iod: str = "MRImage") -> list[str]:
    """Assert dciodvfy finds 0 errors, recognises ``iod`` and warns only allow-listed things."""
    rc, lines = run_dciodvfy(dciodvfy, path)
    errors = [line for line in lines if "Error" in line]
    assert not errors, f"{path.name}: dciodvfy errors: {errors}"
    assert rc == 0, f"{path.name}: dciodvfy rc={rc}: {lines}"
    assert iod in lines, f"{path.name}: IOD {iod} not recognised: {lines}"
    unexpected = [
        line
        for line in lines
        if line.startswith("Warning") and not any(a in line for a in DCIODVFY_ALLOWED_WARNINGS)
    ]
    assert not unexpected, f"{path.name}: unexpected dciodvfy warnings: {unexpected}"
    return lines


_MR_TOP_LEVEL = (
    "PulseSequenceName",
    "MRAcquisitionType",
    "EchoPulseSequence",
    "MultiPlanarExcitation",
    "PhaseContrast",
    "TimeOfFlightContrast",
    "SteadyStatePulseSequence",
    "EchoPlanarPulseSequence",
    "SaturationRecovery",
    "SpectrallySelectedSuppression",
    "OversamplingPhase",
    "GeometryOfKSpaceTraversal",
    "RectilinearPhaseEncodeReordering",
    "SegmentedKSpaceTraversal",
    "CoverageOfKSpace",
    "NumberOfKSpaceTrajectories",
    "ResonantNucleus",
    "KSpaceFiltering",
    "MagneticFieldStrength",
    "ApplicableSafetyStandardAgency",
    "ComplexImageComponent",
    "AcquisitionContrast",
)


def make_enhanced_ct(frames: int = 3, rows: int = 8, cols: int = 10) -> Dataset:
    """Return an Enhanced CT Image with CT functional groups (built from the MR fixture)."""
    ds = make_enhanced_mr(
        frames=frames, rows=rows, cols=cols, sop_uid=ROOT + "6.1", sop_class=ENHANCED_CT
    )
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.PixelRepresentation = 1
    for keyword in _MR_TOP_LEVEL:
        delattr(ds, keyword)
    ds.AcquisitionDuration = 10.0
    ds.PixelPresentation = "MONOCHROME"
    shared = Dataset()
    old = ds.SharedFunctionalGroupsSequence[0]
    shared.PixelMeasuresSequence = old.PixelMeasuresSequence
    shared.PlaneOrientationSequence = old.PlaneOrientationSequence
    shared.FrameAnatomySequence = old.FrameAnatomySequence
    shared.FrameVOILUTSequence = _seq(WindowCenter=40, WindowWidth=400)
    shared.PixelValueTransformationSequence = _seq(
        RescaleIntercept=-1024, RescaleSlope=1, RescaleType="HU"
    )
    shared.CTImageFrameTypeSequence = _seq(
        FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"],
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
    )
    shared.CTAcquisitionTypeSequence = _seq(
        AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO"
    )
    shared.CTAcquisitionDetailsSequence = _seq(
        DataCollectionDiameter=500.0,
        RevolutionTime=0.5,
        SingleCollimationWidth=0.625,
        TotalCollimationWidth=40.0,
        TableHeight=150.0,
        GantryDetectorTilt=0.0,
        RotationDirection="CW",
    )
    shared.CTTableDynamicsSequence = _seq(
        TableSpeed=80.0, TableFeedPerRotation=40.0, SpiralPitchFactor=1.0
    )
    shared.CTGeometrySequence = _seq(
        DistanceSourceToDetector=1085.6, DistanceSourceToDataCollectionCenter=595.0
    )
    shared.CTReconstructionSequence = _seq(
        ReconstructionAlgorithm="FILTER_BACK_PROJ",
        ConvolutionKernel="STANDARD",
        ConvolutionKernelGroup="SOFT_TISSUE",
        ReconstructionDiameter=500.0,
        ReconstructionAngle=360.0,
        ImageFilter="NONE",
        ReconstructionPixelSpacing=[0.9765625, 1.25],
    )
    shared.CTExposureSequence = _seq(
        ExposureTimeInms=500.0,
        XRayTubeCurrentInmA=250.4,
        ExposureInmAs=125.2,
        ExposureModulationType="NONE",
        CTDIvol=12.345678901234,
        CTDIPhantomTypeCodeSequence=Sequence(
            [_code("113691", "DCM", "IEC Body Dosimetry Phantom")]
        ),
    )
    shared.CTXRayDetailsSequence = _seq(
        KVP=120.0, FocalSpots=[1.2], FilterType="BODY", FilterMaterial=["ALUMINUM"]
    )
    shared.IrradiationEventIdentificationSequence = _seq(IrradiationEventUID=ROOT + "7")
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    positions = frame_positions(frames)
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        del item.MRImageFrameTypeSequence
        item.CTPositionSequence = _seq(
            TablePosition=-positions[i][2],
            DataCollectionCenterPatient=[0.0, 0.0, positions[i][2]],
            ReconstructionTargetCenterPatient=[0.0, 0.0, positions[i][2]],
        )
    return ds


ENHANCED_PET: UID = UID("1.2.840.10008.5.1.4.1.1.130")


def make_enhanced_pet(frames: int = 3, rows: int = 8, cols: int = 10) -> Dataset:
    """Return an Enhanced PET Image with PET functional groups (built from the MR fixture)."""
    ds = make_enhanced_mr(
        frames=frames, rows=rows, cols=cols, sop_uid=ROOT + "9.1", sop_class=ENHANCED_PET
    )
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_PET
    ds.Modality = "PT"
    ds.BitsStored = 16
    ds.HighBit = 15
    for keyword in _MR_TOP_LEVEL:
        delattr(ds, keyword)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "NONE"]
    ds.AcquisitionDuration = 600.0
    ds.PixelPresentation = "MONOCHROME"
    ds.ContentQualification = "PRODUCT"
    ds.RadiopharmaceuticalInformationSequence = Sequence(
        [
            _item(
                RadionuclideCodeSequence=Sequence([_code("77004003", "SCT", "^18^Fluorine")]),
                RadiopharmaceuticalCodeSequence=Sequence(
                    [_code("35321007", "SCT", "Fluorodeoxyglucose F^18^")]
                ),
                RadiopharmaceuticalStartDateTime="20260102093000",
                RadionuclideTotalDose=370000000.0,
                RadionuclideHalfLife=6586.2,
                RadionuclidePositronFraction=0.97,
            )
        ]
    )
    for flag in (
        "DecayCorrected",
        "AttenuationCorrected",
        "ScatterCorrected",
        "DeadTimeCorrected",
        "RandomsCorrected",
        "SensitivityCalibrated",
        "DetectorNormalizationCorrection",
    ):
        setattr(ds, flag, "YES")
    for flag in (
        "GantryMotionCorrected",
        "PatientMotionCorrected",
        "CountLossNormalizationCorrected",
        "NonUniformRadialSamplingCorrected",
    ):
        setattr(ds, flag, "NO")
    ds.DecayCorrectionDateTime = "20260102101000"
    ds.CountsSource = "EMISSION"
    old = ds.SharedFunctionalGroupsSequence[0]
    shared = Dataset()
    shared.PixelMeasuresSequence = old.PixelMeasuresSequence
    shared.PlaneOrientationSequence = old.PlaneOrientationSequence
    shared.FrameAnatomySequence = old.FrameAnatomySequence
    shared.PixelValueTransformationSequence = _seq(
        RescaleIntercept=0, RescaleSlope=3.2, RescaleType="BQML"
    )
    shared.RealWorldValueMappingSequence = _seq(
        LUTExplanation="Bq/ml",
        LUTLabel="BQML",
        MeasurementUnitsCodeSequence=Sequence([_code("Bq/ml", "UCUM", "Becquerels/milliliter")]),
        RealWorldValueIntercept=0.0,
        RealWorldValueSlope=3.2,
        RealWorldValueFirstValueMapped=0,
        RealWorldValueLastValueMapped=65535,
    )
    shared.PETFrameTypeSequence = _seq(
        FrameType=["ORIGINAL", "PRIMARY", "STATIC", "NONE"],
        PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE",
    )
    shared.PETReconstructionSequence = _seq(
        ReconstructionType="3D", ReconstructionAlgorithm="OSEM", NumberOfIterations=3
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    positions = frame_positions(frames)
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        del item.MRImageFrameTypeSequence
        item.FrameContentSequence[0].FrameReferenceDateTime = f"2026010210101{i}.500000"
        item.PETPositionSequence = _seq(TablePosition=-positions[i][2])
        item.PETFrameCorrectionFactorsSequence = _seq(
            PrimaryPromptsCountsAccumulated=12345,
            SliceSensitivityFactor=1.0,
            DecayFactor=1.0234,
            ScatterFractionFactor=0.3,
            DeadTimeFactor=1.01,
        )
    return ds

"""Split one Enhanced multi-frame image into classic single-frame images, in memory.

:func:`convert_dataset` takes a decoded Enhanced MR / CT / PET (or Legacy Converted
Enhanced) data set and returns one classic data set per frame. It follows dcm4che's
``emf2sf`` algorithm and UID scheme, with the deviations listed in
``shared/reference/enhanced_mr.md``: only *standard* functional groups are used
(private ones never override geometry), the classic MR attributes are derived,
enhanced-only attributes are removed and computed decimal strings fit their VR.
Pixel data is copied frame by frame without decoding.

Pure: no file I/O, no clock, no threads. Imports pydicom, :mod:`dicomnode.errors`
and :mod:`dicomnode.dicomtags`.

Length: about 1000 lines, on purpose: one algorithm (dcm4che's ``emf2sf``)
whose steps (functional groups per frame, derived MR attributes, removal of
enhanced-only attributes, decimal strings that fit their VR) share its tables
and only make sense together; it is pure and tested as one unit.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import format_number_as_ds

from dicomnode.dicomtags import ENHANCED_MR_COLOR, ENHANCED_TO_CLASSIC
from dicomnode.errors import ConversionError

#: Enhanced SOP Class UID -> classic single-frame SOP Class UID.
CLASSIC_SOP_CLASS: Final = dict(ENHANCED_TO_CLASSIC)

#: Enhanced multi-frame classes that have no classic single-frame counterpart; they are
#: stored unconverted with a log line.
NO_CLASSIC_TARGET: Final = frozenset(
    {
        ENHANCED_MR_COLOR,
        "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
        "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA
        "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
        "1.2.840.10008.5.1.4.1.1.13.1.1",  # X-Ray 3D Angiographic
        "1.2.840.10008.5.1.4.1.1.13.1.2",  # X-Ray 3D Craniofacial
        "1.2.840.10008.5.1.4.1.1.77.1.5.4",  # Ophthalmic Tomography
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    }
    - set(ENHANCED_TO_CLASSIC)
)

_MR: Final = "1.2.840.10008.5.1.4.1.1.4"
_CT: Final = "1.2.840.10008.5.1.4.1.1.2"
_PET: Final = "1.2.840.10008.5.1.4.1.1.128"
_UUID_ROOT: Final = "2.25."
_IS_MAX: Final = 2**31 - 1
#: A DT value: YYYYMMDD, optional HH[MM[SS[.F{1,6}]]], optional UTC offset (dropped).
_DT: Final = re.compile(
    r"((?:1[89]|2[0-9])[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"
    r"(?:(?:[01][0-9]|2[0-3])(?:[0-5][0-9](?:[0-5][0-9](?:\.[0-9]{1,6})?)?)?)?)"
    r"(?:[+-][0-9]{4})?"
)
#: Enhanced In-plane Phase Encoding Direction -> the classic enumerated value.
_PHASE_DIRECTION: Final = {"ROW": "ROW", "COLUMN": "COL", "COL": "COL"}

#: Top-level attributes that exist only in Enhanced (multi-frame) objects, or that the
#: converter replaces; none of them is copied into a classic image.
ENHANCED_ONLY: Final = frozenset(
    {
        # Multi-frame Functional Groups, Dimension, Concatenation, pixel data
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "NumberOfFrames",
        "DimensionOrganizationSequence",
        "DimensionIndexSequence",
        "DimensionOrganizationType",
        "ConcatenationFrameOffsetNumber",
        "RepresentativeFrameNumber",
        "ConcatenationUID",
        "SOPInstanceUIDOfConcatenationSource",
        "InConcatenationNumber",
        "InConcatenationTotalNumber",
        "StereoPairsPresent",
        "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "ReferencedImageEvidenceSequence",
        "SourceImageEvidenceSequence",
        "ReferencedRawDataSequence",
        "ReferencedWaveformSequence",
        # MR Image and Spectroscopy Instance macro, MR Image Description macro
        "ContentQualification",
        "ResonantNucleus",
        "KSpaceFiltering",
        "ApplicableSafetyStandardAgency",
        "ApplicableSafetyStandardDescription",
        "ComplexImageComponent",
        "AcquisitionContrast",
        "PixelPresentation",
        "VolumetricProperties",
        "VolumeBasedCalculationTechnique",
        "PresentationLUTShape",
        "AcquisitionDuration",
        "AcquisitionContextSequence",
        # MR Pulse Sequence module (used for the derivations, then dropped)
        "PulseSequenceName",
        "EchoPulseSequence",
        "MultipleSpinEcho",
        "MultiPlanarExcitation",
        "PhaseContrast",
        "TimeOfFlightContrast",
        "Spoiling",
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
        # Enhanced Cardiac/Respiratory/Bulk Motion Synchronization
        "CardiacSynchronizationTechnique",
        "CardiacSignalSource",
        "CardiacRRIntervalSpecified",
        "CardiacBeatRejectionTechnique",
        "RespiratoryMotionCompensationTechnique",
        "RespiratorySignalSource",
        "RespiratoryTriggerDelayThreshold",
        "RespiratoryTriggerType",
        "BulkMotionCompensationTechnique",
        "BulkMotionSignalSource",
        # Frame-level attributes that may sit at the top of Legacy Converted objects
        "FrameType",
        "FrameAcquisitionNumber",
        "FrameReferenceDateTime",
        "FrameAcquisitionDateTime",
        "FrameAcquisitionDuration",
        "CardiacCyclePosition",
        "RespiratoryCyclePosition",
        "DimensionIndexValues",
        "TemporalPositionIndex",
        "StackID",
        "InStackPositionNumber",
        "FrameComments",
        "FrameLabel",
        # Replaced for every frame
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "SeriesInstanceUID",
    }
)

#: The Supplemental Palette Color Lookup Table module of Enhanced CT/MR/PET (a colour
#: display hint, used with Pixel Presentation COLOR or MIXED). A classic CT, MR or PET image
#: has no Pixel Presentation, so in it these are only allowed with Photometric
#: Interpretation PALETTE COLOR: otherwise dciodvfy reports each as an error.
SUPPLEMENTAL_PALETTE: Final = frozenset(
    {
        "RedPaletteColorLookupTableDescriptor",
        "GreenPaletteColorLookupTableDescriptor",
        "BluePaletteColorLookupTableDescriptor",
        "AlphaPaletteColorLookupTableDescriptor",
        "RedPaletteColorLookupTableData",
        "GreenPaletteColorLookupTableData",
        "BluePaletteColorLookupTableData",
        "AlphaPaletteColorLookupTableData",
        "SegmentedRedPaletteColorLookupTableData",
        "SegmentedGreenPaletteColorLookupTableData",
        "SegmentedBluePaletteColorLookupTableData",
        "SegmentedAlphaPaletteColorLookupTableData",
        "PaletteColorLookupTableUID",
    }
)

#: Classic attributes whose value the MR derivations compute.
_MR_DERIVED: Final = ("ScanningSequence", "SequenceVariant", "ScanOptions")


@dataclass(frozen=True, slots=True)
class _Map:
    """Copy ``source`` from the first item of functional group ``group`` to ``target``."""

    group: str
    source: str
    target: str = ""
    kind: str = "copy"  # copy | ds | ds1 | is


_COMMON_MAPS: Final = (
    _Map("PixelMeasuresSequence", "PixelSpacing"),
    _Map("PixelMeasuresSequence", "SliceThickness"),
    _Map("PixelMeasuresSequence", "SpacingBetweenSlices"),
    _Map("PlanePositionSequence", "ImagePositionPatient"),
    _Map("PlaneOrientationSequence", "ImageOrientationPatient"),
    _Map("PixelValueTransformationSequence", "RescaleIntercept"),
    _Map("PixelValueTransformationSequence", "RescaleSlope"),
    _Map("PixelValueTransformationSequence", "RescaleType"),
    _Map("FrameVOILUTSequence", "WindowCenter"),
    _Map("FrameVOILUTSequence", "WindowWidth"),
    _Map("FrameVOILUTSequence", "WindowCenterWidthExplanation"),
    _Map("FrameVOILUTSequence", "VOILUTFunction"),
    _Map("FrameAnatomySequence", "AnatomicRegionSequence"),
    _Map("FrameAnatomySequence", "FrameLaterality", "ImageLaterality"),
    _Map("FrameContentSequence", "FrameAcquisitionNumber", "AcquisitionNumber", "is"),
    _Map("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime", "TriggerTime", "ds"),
    _Map("FrameContentSequence", "TemporalPositionIndex", "TemporalPositionIdentifier", "is"),
    _Map("IrradiationEventIdentificationSequence", "IrradiationEventUID"),
)

_MR_MAPS: Final = (
    _Map("MRImageFrameTypeSequence", "FrameType", "ImageType"),
    _Map("MREchoSequence", "EffectiveEchoTime", "EchoTime", "ds"),
    _Map("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
    _Map("MRTimingAndRelatedParametersSequence", "FlipAngle"),
    _Map("MRTimingAndRelatedParametersSequence", "EchoTrainLength"),
    _Map("MRFOVGeometrySequence", "InPlanePhaseEncodingDirection"),
    _Map("MRFOVGeometrySequence", "PercentSampling"),
    _Map("MRFOVGeometrySequence", "PercentPhaseFieldOfView"),
    _Map(
        "MRFOVGeometrySequence",
        "MRAcquisitionPhaseEncodingStepsInPlane",
        "NumberOfPhaseEncodingSteps",
        "is",
    ),
    _Map("MRAveragesSequence", "NumberOfAverages"),
    _Map("MRImagingModifierSequence", "PixelBandwidth"),
    _Map("MRImagingModifierSequence", "TransmitterFrequency", "ImagingFrequency", "ds1"),
    _Map("MRReceiveCoilSequence", "ReceiveCoilName"),
    _Map("MRTransmitCoilSequence", "TransmitCoilName"),
    _Map("MRDiffusionSequence", "DiffusionBValue"),
    _Map("MRDiffusionSequence", "DiffusionDirectionality"),
    _Map("MRDiffusionSequence", "DiffusionGradientDirectionSequence"),
)

#: Functional-group sequences copied whole to the top level (their items are the data).
_WHOLE_SEQUENCES: Final = ("RealWorldValueMappingSequence",)

_CT_MAPS: Final = (
    _Map("CTImageFrameTypeSequence", "FrameType", "ImageType"),
    _Map("CTAcquisitionDetailsSequence", "DataCollectionDiameter"),
    _Map("CTAcquisitionDetailsSequence", "GantryDetectorTilt"),
    _Map("CTAcquisitionDetailsSequence", "TableHeight"),
    _Map("CTAcquisitionDetailsSequence", "RotationDirection"),
    _Map("CTAcquisitionDetailsSequence", "RevolutionTime"),
    _Map("CTAcquisitionDetailsSequence", "SingleCollimationWidth"),
    _Map("CTAcquisitionDetailsSequence", "TotalCollimationWidth"),
    _Map("CTTableDynamicsSequence", "TableSpeed"),
    _Map("CTTableDynamicsSequence", "TableFeedPerRotation"),
    _Map("CTTableDynamicsSequence", "SpiralPitchFactor"),
    _Map("CTPositionSequence", "TablePosition"),
    _Map("CTPositionSequence", "ReconstructionTargetCenterPatient"),
    _Map("CTPositionSequence", "DataCollectionCenterPatient"),
    _Map("CTGeometrySequence", "DistanceSourceToDetector"),
    _Map("CTReconstructionSequence", "ConvolutionKernel"),
    _Map("CTReconstructionSequence", "ReconstructionDiameter"),
    _Map("CTExposureSequence", "ExposureTimeInms", "ExposureTime", "is"),
    _Map("CTExposureSequence", "XRayTubeCurrentInmA", "XRayTubeCurrent", "is"),
    _Map("CTExposureSequence", "ExposureInmAs", "Exposure", "is"),
    _Map("CTExposureSequence", "CTDIvol"),
    _Map("CTExposureSequence", "CTDIPhantomTypeCodeSequence"),
    _Map("CTExposureSequence", "ExposureModulationType"),
    _Map("CTXRayDetailsSequence", "KVP"),
    _Map("CTXRayDetailsSequence", "FocalSpots"),
    _Map("CTXRayDetailsSequence", "FilterType"),
)

_PET_MAPS: Final = (
    _Map("PETFrameTypeSequence", "FrameType", "ImageType"),
    _Map("PETFrameCorrectionFactorsSequence", "DecayFactor"),
    _Map("PETFrameCorrectionFactorsSequence", "DeadTimeFactor"),
    _Map("PETFrameCorrectionFactorsSequence", "ScatterFractionFactor"),
    _Map("PETFrameCorrectionFactorsSequence", "SliceSensitivityFactor"),
    _Map("FrameContentSequence", "FrameAcquisitionDuration", "ActualFrameDuration", "is"),
)

_MAPS_BY_CLASS: Final = {_MR: _MR_MAPS, _CT: _CT_MAPS, _PET: _PET_MAPS}

#: Legacy Converted Enhanced objects keep the original classic attributes here.
_UNASSIGNED: Final = (
    "UnassignedSharedConvertedAttributesSequence",
    "UnassignedPerFrameConvertedAttributesSequence",
)

#: Type 2 attributes of the classic MR Image module, added empty when unknown.
_MR_TYPE2: Final = (
    "ScanOptions",
    "MRAcquisitionType",
    "EchoTime",
    "EchoTrainLength",
    "SliceThickness",
)

Cancel = Callable[[], bool]


def name_based_uid(uid: str) -> str:
    """Return the name-based UID dcm4che derives from ``uid`` (``HashUIDMapper``).

    ``"2.25." + decimal(UUID.nameUUIDFromBytes(uid))``: an MD5 (version 3) UUID of
    the UID's ASCII bytes, as an unsigned 128-bit integer. At most 44 characters.

    Parameters
    ----------
    uid : str
        Any UID (padding is stripped).

    Returns
    -------
    str
        The deterministic UID.
    """
    digest = bytearray(
        hashlib.md5(uid.strip("\x00 ").encode("ascii"), usedforsecurity=False).digest()
    )
    digest[6] = (digest[6] & 0x0F) | 0x30
    digest[8] = (digest[8] & 0x3F) | 0x80
    return _UUID_ROOT + str(int.from_bytes(digest, "big"))


def frame_uid(uid: str, frame_number: int) -> str:
    """Return the SOP Instance UID of frame ``frame_number`` (1-based) of ``uid``."""
    return f"{name_based_uid(uid)}.{frame_number}"


def classic_instance_number(original: object, frame_number: int) -> int:
    """Return emf2sf's instance number ``<original><frame:04d>`` if it fits IS, else the frame."""
    prefix = "" if original is None else str(original).strip()
    text = f"{prefix}{frame_number:04d}"[-16:]
    if len(text) <= 12 and text.isdigit() and int(text) <= _IS_MAX:
        return int(text)
    return frame_number


def convert_dataset(src: Dataset, cancel: Cancel | None = None) -> list[Dataset]:
    """Split an Enhanced multi-frame image into classic single-frame images.

    Parameters
    ----------
    src : Dataset
        The complete Enhanced object including Pixel Data and file meta (the
        transfer syntax is taken from ``src.file_meta``).
    cancel : callable, optional
        Polled between frames; when it returns True the conversion stops with
        :class:`ConversionError` (used for a clean shutdown).

    Returns
    -------
    list of Dataset
        One classic object per frame, in frame order, each with file meta.

    Raises
    ------
    ConversionError
        The SOP class has no classic target, functional groups or geometry are
        missing, or the pixel data cannot be split.
    """
    sop_class = str(src.get("SOPClassUID", "")).strip()
    target = CLASSIC_SOP_CLASS.get(sop_class)
    if target is None:
        raise ConversionError(f"SOP class {sop_class or '(none)'} has no classic target")
    sop_uid = str(src.get("SOPInstanceUID", "")).strip()
    series_uid = str(src.get("SeriesInstanceUID", "")).strip()
    if not sop_uid or not series_uid:
        raise ConversionError("missing SOP Instance UID or Series Instance UID")
    try:
        count = int(src.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise ConversionError(f"invalid Number of Frames {src.get('NumberOfFrames')!r}") from None
    if count < 1:
        raise ConversionError(f"invalid Number of Frames {count}")
    shared = _first_item(src, "SharedFunctionalGroupsSequence")
    per_frame = src.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) != count:
        raise ConversionError(
            f"Per-frame Functional Groups Sequence has {len(per_frame or [])} items, "
            f"expected {count}"
        )
    if "PixelData" not in src:
        raise ConversionError("no Pixel Data (Float Pixel Data has no classic target)")
    # Vendor data often has values pydicom would warn about; they are copied as
    # they are (or re-formatted), so the warnings are noise here.
    with config.disable_value_validation(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _convert(src, target, sop_uid, series_uid, count, shared, per_frame, cancel)


def _convert(
    src: Dataset,
    target: str,
    sop_uid: str,
    series_uid: str,
    count: int,
    shared: Dataset | None,
    per_frame: DicomSequence,
    cancel: Cancel | None,
) -> list[Dataset]:
    pixels = _PixelSplitter(src, count)
    base = _base_dataset(src)
    # Decode every functional-group element once, in the source's encoding, so values
    # copied out of them are re-encoded correctly (big endian -> little endian).
    for item in [shared, *per_frame]:
        if item is not None:
            _walk_convert(item)
    offsets = _numbers(src.get("ConcatenationFrameOffsetNumber"))
    offset = int(offsets[0]) if offsets else 0
    temporal = _temporal_positions(shared, per_frame)
    if temporal:
        base.NumberOfTemporalPositions = temporal
    new_series = name_based_uid(series_uid)
    maps = _COMMON_MAPS + _MAPS_BY_CLASS.get(target, ())
    out: list[Dataset] = []
    for index in range(count):
        if cancel is not None and cancel():
            raise ConversionError("cancelled")
        groups = _frame_groups(shared, per_frame[index])
        ds = copy.deepcopy(base)
        _flatten_unassigned(ds, groups)
        _apply_maps(ds, groups, maps)
        for keyword in _WHOLE_SEQUENCES:
            if keyword in groups:
                ds[keyword] = copy.deepcopy(groups[keyword])
        _check_geometry(ds, index + 1)
        if "Laterality" in ds and "ImageLaterality" in ds:
            del ds.ImageLaterality  # dciodvfy: series Laterality excludes Image Laterality
        _apply_references(ds, groups)
        _apply_acquisition_time(ds, src, groups)
        _apply_slice_location(ds)
        if target == _MR:
            _apply_mr(ds, src, groups)
        elif target == _CT:
            _fill_empty(ds, ("KVP", "AcquisitionNumber", "SliceThickness"))
        elif target == _PET:
            _apply_pet(ds, src, groups, index, count, temporal)
        ds.SOPClassUID = target
        ds.SOPInstanceUID = frame_uid(sop_uid, index + 1)
        ds.SeriesInstanceUID = new_series
        ds.InstanceNumber = classic_instance_number(src.get("InstanceNumber"), offset + index + 1)
        _fix_decimal_strings(ds)
        pixels.add_frame(ds, index)
        out.append(ds)
    return out


# --------------------------------------------------------------------------- building blocks


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    value = ds.get(keyword)
    if isinstance(value, DicomSequence) and len(value) > 0:
        item = value[0]
        return item if isinstance(item, Dataset) else None
    return None


def _base_dataset(src: Dataset) -> Dataset:
    """Return the top-level attributes every frame shares (enhanced-only ones removed).

    The Supplemental Palette Color LUT is removed too unless the image is PALETTE COLOR.
    """
    base = Dataset()
    palette = _text(src.get("PhotometricInterpretation")) == "PALETTE COLOR"
    for elem in src:  # iterating converts raw elements, so the encoding can change
        if elem.keyword in ENHANCED_ONLY or elem.tag.group in (0x0002, 0xFFFC, 0xFFFE):
            continue
        if not palette and elem.keyword in SUPPLEMENTAL_PALETTE:
            continue
        base.add(copy.deepcopy(elem))
    _walk_convert(base)
    return base


def _walk_convert(ds: Dataset) -> None:
    """Convert every raw element, also inside sequences (safe re-encoding, e.g. big endian)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _walk_convert(item)


def _frame_groups(shared: Dataset | None, frame: Dataset) -> dict[str, DataElement]:
    """Return the standard functional-group sequences of one frame; per-frame overrides shared."""
    groups: dict[str, DataElement] = {}
    for fg in (shared, frame):
        if fg is None:
            continue
        for elem in fg:
            if elem.tag.is_private or elem.VR != "SQ" or not elem.keyword or not elem.value:
                continue
            groups[elem.keyword] = elem
    return groups


def _group_item(groups: dict[str, DataElement], keyword: str) -> Dataset | None:
    elem = groups.get(keyword)
    if elem is None or not elem.value:
        return None
    item = elem.value[0]
    return item if isinstance(item, Dataset) else None


def _flatten_unassigned(ds: Dataset, groups: dict[str, DataElement]) -> None:
    """Copy the classic attributes a Legacy Converted object keeps in its unassigned groups."""
    for keyword in _UNASSIGNED:
        item = _group_item(groups, keyword)
        if item is None:
            continue
        for elem in item:
            if elem.tag.is_private or elem.keyword in ENHANCED_ONLY:
                continue
            ds.add(copy.deepcopy(elem))


def _apply_maps(ds: Dataset, groups: dict[str, DataElement], maps: Iterable[_Map]) -> None:
    for m in maps:
        item = _group_item(groups, m.group)
        if item is None or m.source not in item:
            continue
        elem = item[m.source]
        target = m.target or m.source
        if m.kind == "copy":
            new = copy.deepcopy(elem)
            if target != m.source:
                new = DataElement(target, elem.VR, new.value)
            ds[target] = new
            continue
        values = _numbers(elem.value)
        if not values:
            continue
        if m.kind == "is":
            setattr(ds, target, round(values[0]))
        elif m.kind == "ds1":
            setattr(ds, target, _ds(values[0]))
        else:
            setattr(ds, target, _ds(values[0]) if len(values) == 1 else [_ds(v) for v in values])


def _numbers(value: object) -> list[float]:
    seq = value if isinstance(value, list | tuple | MultiValue) else [value]
    out: list[float] = []
    for v in seq:
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def _ds(value: float) -> str:
    """Format a number as a valid Decimal String (at most 16 characters)."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return format_number_as_ds(float(value))


def _check_geometry(ds: Dataset, frame_number: int) -> None:
    for keyword, n in (
        ("ImagePositionPatient", 3),
        ("ImageOrientationPatient", 6),
        ("PixelSpacing", 2),
    ):
        value = ds.get(keyword)
        if value is None or len(_numbers(value)) != n:
            raise ConversionError(
                f"frame {frame_number} has no valid {keyword} in the standard functional groups"
            )


def _repoint(items: Iterable[Dataset]) -> list[Dataset]:
    """Re-point references to converted enhanced objects at the classic frames (emf2sf step 8)."""
    out: list[Dataset] = []
    for item in items:
        ref_class = str(item.get("ReferencedSOPClassUID", "")).strip()
        ref_uid = str(item.get("ReferencedSOPInstanceUID", "")).strip()
        if ref_class not in CLASSIC_SOP_CLASS or not ref_uid:
            out.append(copy.deepcopy(item))
            continue
        frames = item.get("ReferencedFrameNumber")
        numbers = [int(f) for f in _numbers(frames)] if frames is not None else [1]
        for n in numbers or [1]:
            new = copy.deepcopy(item)
            if "ReferencedFrameNumber" in new:
                del new.ReferencedFrameNumber
            new.ReferencedSOPClassUID = CLASSIC_SOP_CLASS[ref_class]
            new.ReferencedSOPInstanceUID = frame_uid(ref_uid, n)
            out.append(new)
    return out


def _apply_references(ds: Dataset, groups: dict[str, DataElement]) -> None:
    refs = groups.get("ReferencedImageSequence")
    if refs is not None and refs.value:
        ds.ReferencedImageSequence = _repoint(refs.value)
    derivation = groups.get("DerivationImageSequence")
    if derivation is None or not derivation.value:
        return
    first = derivation.value[0]
    if "DerivationDescription" in first:
        ds.DerivationDescription = first.DerivationDescription
    if first.get("DerivationCodeSequence"):
        ds.DerivationCodeSequence = copy.deepcopy(first.DerivationCodeSequence)
    sources: list[Dataset] = []
    for item in derivation.value:
        sources.extend(_repoint(item.get("SourceImageSequence") or []))
    if sources:
        ds.SourceImageSequence = sources


def _valid_datetime(value: object) -> str:
    """Return ``value`` as a DT without its UTC offset if it is a plausible DT, else ''."""
    text = str(value or "").strip()
    match = _DT.fullmatch(text)
    if match is None:
        return ""
    return match.group(1)


def _apply_acquisition_time(ds: Dataset, src: Dataset, groups: dict[str, DataElement]) -> None:
    """Set AcquisitionDate/Time (and DateTime) from FrameAcquisitionDateTime.

    Falls back to the top-level Acquisition DateTime; implausible values (some
    vendors write zeros for derived frames) are ignored.
    """
    content = _group_item(groups, "FrameContentSequence")
    value = _valid_datetime((content or Dataset()).get("FrameAcquisitionDateTime"))
    if not value:
        value = _valid_datetime(src.get("AcquisitionDateTime"))
    if not value:
        return
    ds.AcquisitionDateTime = value
    ds.AcquisitionDate = value[:8]
    if len(value) > 8:
        ds.AcquisitionTime = value[8:]


def _temporal_positions(shared: Dataset | None, per_frame: DicomSequence) -> int:
    """Return the highest Temporal Position Index when every frame has one, else 0."""
    highest = 0
    for frame in per_frame:
        content = _group_item(_frame_groups(shared, frame), "FrameContentSequence")
        values = _numbers((content or Dataset()).get("TemporalPositionIndex"))
        if not values:
            return 0
        highest = max(highest, int(values[0]))
    return highest


def _apply_slice_location(ds: Dataset) -> None:
    """Set SliceLocation (position along the image normal) unless the source has one."""
    if "SliceLocation" in ds:
        return
    ipp = _numbers(ds.get("ImagePositionPatient"))
    iop = _numbers(ds.get("ImageOrientationPatient"))
    if len(ipp) != 3 or len(iop) != 6:
        return
    r, c = iop[:3], iop[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    ds.SliceLocation = _ds(round(sum(p * n for p, n in zip(ipp, normal, strict=True)), 6))


def _fill_empty(ds: Dataset, keywords: Sequence[str]) -> None:
    for keyword in keywords:
        if keyword not in ds:
            setattr(ds, keyword, None)


def _text(value: object) -> str:
    return "" if value is None else str(value).strip().upper()


def _apply_mr(ds: Dataset, src: Dataset, groups: dict[str, DataElement]) -> None:
    """Derive the classic MR Image attributes (ScanningSequence, InversionTime, ...)."""
    lookup: dict[str, object] = {}
    for elem in src:
        if elem.VR != "SQ" and elem.keyword and elem.keyword != "PixelData":
            lookup[elem.keyword] = elem.value
    for keyword in (
        "MRModifierSequence",
        "MRImagingModifierSequence",
        "MRFOVGeometrySequence",
        "MRImageFrameTypeSequence",
    ):
        item = _group_item(groups, keyword)
        if item is not None:
            for elem in item:
                if elem.VR != "SQ" and elem.keyword:
                    lookup[elem.keyword] = elem.value

    def v(keyword: str) -> str:
        return _text(lookup.get(keyword))

    def present_not(keyword: str, *values: str) -> bool:
        return bool(v(keyword)) and v(keyword) not in values

    image_type = [str(x).strip().upper() for x in _as_list(ds.get("ImageType"))]
    if not _has_value(ds, "ScanningSequence"):
        scanning = []
        if v("EchoPulseSequence") != "GRADIENT":
            scanning.append("SE")
        if v("EchoPulseSequence") != "SPIN":
            scanning.append("GR")
        if v("InversionRecovery") == "YES":
            scanning.append("IR")
        if v("EchoPlanarPulseSequence") == "YES":
            scanning.append("EP")
        ds.ScanningSequence = scanning
    if not _has_value(ds, "SequenceVariant"):
        variant = []
        if present_not("SegmentedKSpaceTraversal", "SINGLE"):
            variant.append("SK")
        if present_not("MagnetizationTransfer", "NONE"):
            variant.append("MTC")
        if present_not("SteadyStatePulseSequence", "NONE"):
            variant.append("TRSS" if v("SteadyStatePulseSequence") == "TIME_REVERSED" else "SS")
        if present_not("Spoiling", "NONE"):
            variant.append("SP")
        if v("InversionRecovery") == "YES" or v("T2Preparation") == "YES":
            variant.append("MP")
        if present_not("OversamplingPhase", "NONE"):
            variant.append("OSP")
        ds.SequenceVariant = variant or ["NONE"]
    if not _has_value(ds, "ScanOptions"):
        options = []
        if present_not("RectilinearPhaseEncodeReordering", "LINEAR"):
            options.append("PER")
        if present_not("CardiacSynchronizationTechnique", "NONE"):
            options.append("PPG" if v("CardiacSignalSource") == "PP" else "CG")
        if present_not("RespiratoryMotionCompensationTechnique", "NONE"):
            options.append("RG")
        if v("PartialFourier") != "NO":
            direction = v("PartialFourierDirection")
            if direction in ("PHASE", "COMBINATION"):
                options.append("PFP")
            if direction in ("FREQUENCY", "COMBINATION"):
                options.append("PFF")
        if present_not("SpatialPresaturation", "NONE"):
            options.append("SP")
        if v("SpectrallySelectedSuppression").startswith("FAT"):
            options.append("FS")
        if present_not("FlowCompensation", "NONE"):
            options.append("FC")
        ds.ScanOptions = options if options else None
    if len(image_type) > 2 and image_type[2] == "ANGIO":
        ds.AngioFlag = "Y"
    if "SequenceName" not in ds and v("PulseSequenceName"):
        ds.SequenceName = str(lookup["PulseSequenceName"])
    if "ImagedNucleus" not in ds and v("ResonantNucleus"):
        ds.ImagedNucleus = str(lookup["ResonantNucleus"])
    direction = _PHASE_DIRECTION.get(v("InPlanePhaseEncodingDirection"), "")
    if direction:
        ds.InPlanePhaseEncodingDirection = direction
    elif "InPlanePhaseEncodingDirection" in ds:
        del ds.InPlanePhaseEncodingDirection  # OTHER has no classic value (Type 3)
    fov = _group_item(groups, "MRFOVGeometrySequence")
    if fov is not None and "AcquisitionMatrix" not in ds:
        freq = _numbers(fov.get("MRAcquisitionFrequencyEncodingSteps"))
        phase = _numbers(fov.get("MRAcquisitionPhaseEncodingStepsInPlane"))
        if freq and phase and direction:
            f, p = int(freq[0]), int(phase[0])
            ds.AcquisitionMatrix = [f, 0, 0, p] if direction == "ROW" else [0, f, p, 0]
    timing = _group_item(groups, "MRTimingAndRelatedParametersSequence")
    sar = _first_item(timing, "SpecificAbsorptionRateSequence") if timing is not None else None
    if sar is not None and "SAR" not in ds:
        values = _numbers(sar.get("SpecificAbsorptionRateValue"))
        if values:
            ds.SAR = _ds(values[0])
    scanning_now = [str(x).upper() for x in _as_list(ds.get("ScanningSequence"))]
    if "IR" in scanning_now:
        modifier = _group_item(groups, "MRModifierSequence")
        times = _numbers((modifier or Dataset()).get("InversionTimes"))
        if not _has_value(ds, "InversionTime"):
            ds.InversionTime = _ds(times[0]) if times else None
    elif "InversionTime" in ds:
        del ds.InversionTime
    _fill_empty(ds, _MR_TYPE2)
    options_now = [str(x).upper() for x in _as_list(ds.get("ScanOptions"))]
    if "CG" in options_now or "PPG" in options_now:
        _fill_empty(ds, ("TriggerTime",))
    elif "TriggerTime" in ds:
        del ds.TriggerTime  # Type 2C: only with cardiac or peripheral-pulse gating
    is_ep = "EP" in scanning_now
    has_sk = "SK" in [str(x).upper() for x in _as_list(ds.get("SequenceVariant"))]
    if "RepetitionTime" not in ds and (not is_ep or has_sk):
        ds.RepetitionTime = None
    slope = _numbers(ds.get("RescaleSlope"))
    intercept = _numbers(ds.get("RescaleIntercept"))
    if slope == [1.0] and intercept == [0.0]:
        # An identity Modality LUT says nothing; classic MR does not expect one.
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)


#: Enhanced PET correction flags -> classic Corrected Image (0028,0051) values.
_PET_CORRECTIONS: Final = (
    ("DecayCorrected", "DECY"),
    ("AttenuationCorrected", "ATTN"),
    ("ScatterCorrected", "SCAT"),
    ("DeadTimeCorrected", "DTIM"),
    ("GantryMotionCorrected", "MOTN"),
    ("PatientMotionCorrected", "PMOT"),
    ("CountLossNormalizationCorrected", "CLN"),
    ("RandomsCorrected", "RAN"),
    ("NonUniformRadialSamplingCorrected", "RADL"),
    ("SensitivityCalibrated", "DCAL"),
    ("DetectorNormalizationCorrection", "NORM"),
)
#: Classic PET Units (0054,1001) defined terms.
_PET_UNITS: Final = frozenset(
    {
        "CNTS", "NONE", "CM2", "CM2ML", "PCNT", "CPS", "BQML", "MGMINML", "UMOLMINML",
        "MLMING", "MLG", "1CM", "UMOLML", "PROPCNTS", "PROPCPS", "MLMINML", "MLML", "GML",
        "STDDEV",
    }
)  # fmt: skip
#: UCUM units of a Real World Value Mapping -> classic PET Units.
_UCUM_TO_PET_UNITS: Final = {
    "Bq/ml": "BQML",
    "{counts}": "CNTS",
    "{counts}/s": "CPS",
    "g/ml": "GML",
    "{SUVbw}g/ml": "GML",
    "%": "PCNT",
    "/cm": "1CM",
    "1": "NONE",
}


def _pet_units(ds: Dataset) -> str:
    rescale_type = str(ds.get("RescaleType", "") or "").strip().upper()
    if rescale_type in _PET_UNITS:
        return rescale_type
    for mapping in ds.get("RealWorldValueMappingSequence") or []:
        for code in mapping.get("MeasurementUnitsCodeSequence") or []:
            unit = _UCUM_TO_PET_UNITS.get(str(code.get("CodeValue", "")).strip())
            if unit:
                return unit
    return "NONE"


def _seconds_between(start: object, end: object) -> float | None:
    """Return ``end - start`` in seconds for two DT values, or None."""
    import datetime as dt

    stamps = []
    for value in (start, end):
        text = _valid_datetime(value)
        if len(text) < 14:
            return None
        fraction = text[15:] if len(text) > 15 else "0"
        stamps.append(
            dt.datetime.strptime(text[:14], "%Y%m%d%H%M%S")
            + dt.timedelta(microseconds=int(fraction.ljust(6, "0")[:6]))
        )
    return (stamps[1] - stamps[0]).total_seconds()


#: Patient Position -> (orientation, orientation modifier, gantry relationship), SNOMED CT.
_PATIENT_POSITION_CODES: Final = {
    "HFS": (("102538003", "recumbent"), ("40199007", "supine"), ("102540008", "headfirst")),
    "FFS": (("102538003", "recumbent"), ("40199007", "supine"), ("102541007", "feet-first")),
    "HFP": (("102538003", "recumbent"), ("1240000", "prone"), ("102540008", "headfirst")),
    "FFP": (("102538003", "recumbent"), ("1240000", "prone"), ("102541007", "feet-first")),
    "HFDL": (
        ("102538003", "recumbent"),
        ("102535000", "left lateral decubitus"),
        ("102540008", "headfirst"),
    ),
    "HFDR": (
        ("102538003", "recumbent"),
        ("102536004", "right lateral decubitus"),
        ("102540008", "headfirst"),
    ),
    "FFDL": (
        ("102538003", "recumbent"),
        ("102535000", "left lateral decubitus"),
        ("102541007", "feet-first"),
    ),
    "FFDR": (
        ("102538003", "recumbent"),
        ("102536004", "right lateral decubitus"),
        ("102541007", "feet-first"),
    ),
}


def _sct(code: tuple[str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue = code[0]
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = code[1]
    return item


def _apply_pet_orientation(ds: Dataset) -> None:
    """Express Patient Position as the NM/PET Patient Orientation codes classic PET uses.

    The NM/PET Patient Orientation module is Type 2 and excludes Patient Position.
    """
    position = str(ds.get("PatientPosition", "") or "").strip().upper()
    if "PatientOrientationCodeSequence" not in ds:
        codes = _PATIENT_POSITION_CODES.get(position)
        if codes is None:
            ds.PatientOrientationCodeSequence = []
            ds.PatientGantryRelationshipCodeSequence = []
        else:
            orientation = _sct(codes[0])
            orientation.PatientOrientationModifierCodeSequence = [_sct(codes[1])]
            ds.PatientOrientationCodeSequence = [orientation]
            ds.PatientGantryRelationshipCodeSequence = [_sct(codes[2])]
    if "PatientGantryRelationshipCodeSequence" not in ds:
        ds.PatientGantryRelationshipCodeSequence = []
    if "PatientPosition" in ds:
        del ds.PatientPosition


def _apply_pet(
    ds: Dataset,
    src: Dataset,
    groups: dict[str, DataElement],
    index: int,
    count: int,
    temporal: int,
) -> None:
    """Derive the classic PET Series and PET Image attributes (best effort)."""
    image_type = [str(x).strip().upper() for x in _as_list(ds.get("ImageType"))]
    kind = image_type[2] if len(image_type) > 2 else ""
    if "SeriesType" not in ds:
        if kind in ("STATIC", "DYNAMIC", "GATED"):
            first = kind
        elif kind in ("WHOLE_BODY", "WHOLE BODY"):
            first = "WHOLE BODY"
        else:
            first = "DYNAMIC" if temporal > 1 else "STATIC"
        ds.SeriesType = [first, "IMAGE"]
    if "Units" not in ds:
        ds.Units = _pet_units(ds)
    if "CountsSource" not in ds:
        ds.CountsSource = "EMISSION"
    if "NumberOfSlices" not in ds:
        ds.NumberOfSlices = max(1, count // max(temporal, 1))
    if str(_as_list(ds.SeriesType)[0]).upper() == "DYNAMIC" and "NumberOfTimeSlices" not in ds:
        ds.NumberOfTimeSlices = max(temporal, 1)
    if "CorrectedImage" not in ds:
        corrected = [term for flag, term in _PET_CORRECTIONS if _text(src.get(flag)) == "YES"]
        ds.CorrectedImage = corrected if corrected else None
    if "DecayCorrection" not in ds:
        if _text(src.get("DecayCorrected")) == "YES":
            starts = [
                item.get("RadiopharmaceuticalStartDateTime")
                for item in src.get("RadiopharmaceuticalInformationSequence") or []
            ]
            at_admin = starts and _seconds_between(starts[0], src.get("DecayCorrectionDateTime"))
            ds.DecayCorrection = "ADMIN" if at_admin == 0 else "START"
        else:
            ds.DecayCorrection = "NONE"
    if ds.DecayCorrection == "NONE" and "DecayFactor" in ds:
        del ds.DecayFactor
    content = _group_item(groups, "FrameContentSequence") or Dataset()
    if "FrameReferenceTime" not in ds:
        offset = _seconds_between(
            src.get("AcquisitionDateTime"), content.get("FrameReferenceDateTime")
        )
        ds.FrameReferenceTime = _ds(round(offset * 1000.0, 3)) if offset is not None else "0"
    _fill_empty(ds, ("CollimatorType",))
    _apply_pet_orientation(ds)
    ds.ImageIndex = index + 1
    if "RescaleType" in ds:
        del ds.RescaleType  # Units carries it in classic PET


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    if isinstance(value, list | tuple | MultiValue):
        return list(value)
    return [value]


def _has_value(ds: Dataset, keyword: str) -> bool:
    elem = ds.get(keyword)
    return elem is not None and elem != "" and _as_list(elem) != []


def _fix_decimal_strings(ds: Dataset) -> None:
    """Re-format top-level DS values longer than 16 characters (pydicom would write them)."""
    for elem in ds:
        if elem.VR != "DS" or elem.value is None or elem.value == "":
            continue
        values = _as_list(elem.value)
        if all(len(str(x)) <= 16 for x in values):
            continue
        fixed = [_ds(n) for n in _numbers(values)]
        if len(fixed) == len(values):
            elem.value = fixed[0] if len(fixed) == 1 else fixed


# --------------------------------------------------------------------------- pixel data


class _PixelSplitter:
    """Cut one frame's pixel data out of a multi-frame object without decoding it."""

    def __init__(self, src: Dataset, count: int) -> None:
        meta = getattr(src, "file_meta", None)
        ts = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
        if not ts:
            implicit, little = src.original_encoding
            if little is False:
                ts = ExplicitVRBigEndian
            elif implicit:
                ts = ImplicitVRLittleEndian
            else:
                ts = ExplicitVRLittleEndian
        self.count = count
        self.data: bytes = src.PixelData
        self.encapsulated = ts.is_encapsulated and ts != DeflatedExplicitVRLittleEndian
        self.big_endian = ts == ExplicitVRBigEndian
        self.source_ts = ts
        if self.encapsulated:
            self.out_ts = ts
        elif ts == ImplicitVRLittleEndian:
            self.out_ts = ImplicitVRLittleEndian
        else:
            self.out_ts = ExplicitVRLittleEndian
        self.offsets: tuple[bytes, bytes] | None = None
        if self.encapsulated and "ExtendedOffsetTable" in src:
            self.offsets = (src.ExtendedOffsetTable, src.ExtendedOffsetTableLengths)
        try:
            rows, cols = int(src.Rows), int(src.Columns)
            samples = int(src.get("SamplesPerPixel") or 1)
            self.bits = int(src.BitsAllocated)
        except (AttributeError, TypeError, ValueError):
            raise ConversionError("Rows, Columns or Bits Allocated missing") from None
        self.frame_bits = rows * cols * samples * self.bits
        if not self.encapsulated and len(self.data) * 8 < self.frame_bits * count:
            raise ConversionError(
                f"Pixel Data has {len(self.data)} bytes, fewer than {count} frames need"
            )
        self.vr = "OB" if self.encapsulated or self.bits <= 8 else "OW"

    def frame(self, index: int) -> bytes:
        """Return frame ``index`` (0-based) in the output transfer syntax."""
        if self.encapsulated:
            try:
                raw = get_frame(
                    self.data, index, extended_offsets=self.offsets, number_of_frames=self.count
                )
            except (ValueError, KeyError, IndexError) as exc:
                raise ConversionError(
                    f"cannot split encapsulated frame {index + 1}: {exc}"
                ) from None
            return encapsulate([raw], has_bot=False)
        start, length = index * self.frame_bits, self.frame_bits
        if start % 8 or length % 8:  # BitsAllocated 1: frames need not start on a byte
            chunk = self.data[start // 8 : (start + length + 7) // 8]
            value = int.from_bytes(chunk, "little") >> (start % 8)
            value &= (1 << length) - 1
            return value.to_bytes((length + 7) // 8, "little")
        data = self.data[start // 8 : (start + length) // 8]
        if self.big_endian and self.bits in (16, 32):
            width = self.bits // 8
            swapped = bytearray(len(data))
            for k in range(width):
                swapped[k::width] = data[width - 1 - k :: width]
            data = bytes(swapped)
        return data

    def add_frame(self, ds: Dataset, index: int) -> None:
        """Set Pixel Data and file meta of the classic object for frame ``index``."""
        elem = DataElement(0x7FE00010, self.vr, self.frame(index))
        if self.encapsulated:
            elem.is_undefined_length = True
        ds.add(elem)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = self.out_ts
        ds.file_meta = meta

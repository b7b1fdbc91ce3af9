"""Native conversion of every Enhanced multi-frame object shipped by pydicom and ``pydicom-data``.

For each output frame dciodvfy must report no error the source object itself
does not have (real objects carry their own defects; the converter must not add
any). Files are listed from pydicom's own test folder and its external data
sources (``pydicom-data``), without the network downloads of
``get_testdata_files``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT, external_data_sources

from dicomnode.convert.native import SUPPLEMENTAL_PALETTE, convert_dataset
from dicomnode.dicomtags import ENHANCED_TO_CLASSIC
from dicomnode.errors import ConversionError
from tests.conftest import IN_CI, require_tool
from tests.enhanced_factory import run_dciodvfy


def _shipped_files() -> list[Path]:
    files = {p for p in Path(DATA_ROOT, "test_files").rglob("*") if p.is_file()}
    for source in external_data_sources().values():
        files |= {Path(p) for p in source.get_paths("**/*", 0)}
    return sorted(files)


def _enhanced_files() -> list[Path]:
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in _shipped_files():
            try:
                sop_class = str(dcmread(path, stop_before_pixels=True).get("SOPClassUID", ""))
            except Exception:
                continue
            if sop_class in ENHANCED_TO_CLASSIC:
                found.append(path)
    return found


ENHANCED = _enhanced_files()


def _errors(dciodvfy: str, path: Path) -> set[str]:
    """dciodvfy's error messages, without the parts that name modules and values."""
    _, lines = run_dciodvfy(dciodvfy, path)
    return {
        re.sub(r"\s+", " ", re.sub(r" Module=<[^>]*>| - values are .*", "", line)).strip()
        for line in lines
        if line.startswith("Error")
    }


def test_convert_bundled_objects_are_found() -> None:
    """pydicom-data (a test dependency) ships the Enhanced CT with a supplemental palette."""
    names = {p.name for p in ENHANCED}
    if "eCT_Supplemental.dcm" not in names and not IN_CI:
        pytest.skip("pydicom-data is not installed")
    assert "eCT_Supplemental.dcm" in names


@pytest.mark.parametrize("path", ENHANCED, ids=[p.name for p in ENHANCED])
def test_convert_bundled_enhanced_object_adds_no_dciodvfy_error(tmp_path: Path, path: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = dcmread(path)
        try:
            frames = convert_dataset(src)
        except ConversionError:
            # refused cleanly (stored unconverted): only objects the converter cannot read
            assert "PerFrameFunctionalGroupsSequence" not in src or not src.get(
                "PerFrameFunctionalGroupsSequence"
            ), f"{path.name} has functional groups and must convert"
            return
    assert len(frames) == int(src.NumberOfFrames)
    source_errors = _errors(dciodvfy, path)
    for i, ds in enumerate(frames):
        out = tmp_path / f"frame{i}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(out, enforce_file_format=True)
        added = _errors(dciodvfy, out) - source_errors
        assert not added, f"{path.name} frame {i + 1}: dciodvfy errors the source lacks: {added}"


def test_convert_supplemental_palette_is_dropped_from_monochrome_frames() -> None:
    path = next((p for p in ENHANCED if p.name == "eCT_Supplemental.dcm"), None)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    src = dcmread(path)
    assert any(k in src for k in SUPPLEMENTAL_PALETTE)
    for ds in convert_dataset(src):
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert not any(k in ds for k in SUPPLEMENTAL_PALETTE)

"""Property tests of name sanitising: no value in a header can escape or break the layout.

``dicomtags.safe_component`` and ``organise.relative_path`` are fed arbitrary
text (control characters, separators, reserved device names, every Unicode
plane, very long values) and layouts; the result must stay one safe name per
level, inside the AE folder, on both Windows and Linux.
"""

from __future__ import annotations

import unicodedata
from pathlib import PurePosixPath, PureWindowsPath

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomnode.config import LAYOUT_FIELDS
from dicomnode.dicomtags import MAX_COMPONENT, WINDOWS_RESERVED, safe_component
from dicomnode.organise import relative_path

UNSAFE_CHARS = set('<>:"/\\|?*')
#: ext4, XFS, NTFS (in UTF-16 units) and most others limit one name to 255.
NAME_MAX_BYTES = 255

HOSTILE_SAMPLES = [
    "..",
    ".",
    "../../etc/passwd",
    "..\\..\\Windows",
    "CON",
    "con.txt",
    "NUL.dcm",
    "COM1",
    "LPT9.",
    "AUX ",
    "CONIN$",
    "X" * 300,
    "A\x00B\x01C\x1b[31m\x7f",
    "\u202eevil\u202d",
    "山田^太郎=やまだ^たろう",
    " . . ",
    "",
    "   ",
    "___",
    "a/b\\c:d*e?f|g<h>",
]

text_values = st.one_of(st.sampled_from(HOSTILE_SAMPLES), st.text(max_size=400))


def assert_safe_name(name: str, max_len: int = MAX_COMPONENT) -> None:
    """Fail unless ``name`` is one safe file or folder name on Windows and Linux."""
    assert name, "empty name"
    assert len(name) <= max_len, (len(name), name)
    assert name not in (".", "..")
    assert not UNSAFE_CHARS & set(name), name
    assert all(unicodedata.category(ch)[0] != "C" for ch in name), repr(name)
    assert not name.endswith((".", " ")), repr(name)
    assert name.split(".")[0].upper().rstrip(" ") not in WINDOWS_RESERVED, name
    assert len(PurePosixPath(name).parts) == 1 and len(PureWindowsPath(name).parts) == 1, name


@example(text="CON", max_len=64)
@example(text="..", max_len=16)
@example(text="X" * 300, max_len=16)
@given(text=text_values, max_len=st.integers(min_value=16, max_value=255))
def test_names_safe_component_is_always_one_safe_name(text: str, max_len: int) -> None:
    assert_safe_name(safe_component(text, "UNKNOWN", max_len), max_len)


@given(text=text_values)
def test_names_safe_component_is_idempotent(text: str) -> None:
    once = safe_component(text)
    assert safe_component(once) == once


@given(
    text=st.text(alphabet=st.characters(min_codepoint=0x10000, max_codepoint=0x1FFFF), min_size=64)
)
@settings(max_examples=20)
def test_names_safe_component_fits_a_file_system_name(text: str) -> None:
    assume(any(unicodedata.category(ch)[0] != "C" for ch in text))
    assert len(safe_component(text).encode("utf-8")) <= NAME_MAX_BYTES


_VRS = {
    "PatientID": "LO",
    "PatientName": "PN",
    "StudyDescription": "LO",
    "SeriesDescription": "LO",
    "Modality": "CS",
    "StudyDate": "DA",
    "SeriesNumber": "IS",
    "SOPInstanceUID": "UI",
    "StudyInstanceUID": "UI",
    "SeriesInstanceUID": "UI",
}


def _header(values: dict[str, str]) -> Dataset:
    """Return a header as the receiver sees one: raw, undecoded values from the wire."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword, value in values.items():
        tag = Tag(keyword)
        raw = value.encode("utf-8", "surrogatepass")
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(tag, _VRS[keyword], len(raw), raw, 0, False, True)  # type: ignore[assignment]
    return ds


layouts = st.lists(
    st.lists(st.sampled_from(sorted(LAYOUT_FIELDS)), min_size=1, max_size=3).map(
        lambda fields: "_".join("{" + f + "}" for f in fields)
    ),
    min_size=1,
    max_size=4,
).map("/".join)

headers = st.fixed_dictionaries(
    {},
    optional={
        keyword: text_values
        for keyword in (
            "PatientID",
            "PatientName",
            "StudyDescription",
            "SeriesDescription",
            "Modality",
            "StudyDate",
            "SeriesNumber",
            "SOPInstanceUID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
        )
    },
)


@given(values=headers, layout=st.one_of(st.just("{patient}/{study}/{series}"), layouts))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_names_relative_path_never_escapes_and_every_level_is_safe(
    values: dict[str, str], layout: str
) -> None:
    path = relative_path(_header(values), layout)
    assert not path.is_absolute()
    assert len(path.parts) == layout.count("/") + 2
    for part in path.parts:
        assert_safe_name(part, max_len=max(MAX_COMPONENT, 16 + 1 + 64 + 4))
    assert path.name.endswith(".dcm")
    root = PurePosixPath("/dest/incoming")
    joined = root / path
    assert ".." not in joined.parts
    assert joined.parts[: len(root.parts)] == root.parts


@given(
    uid=st.lists(st.integers(min_value=0, max_value=10**12), min_size=2, max_size=8).map(
        lambda parts: ".".join(map(str, parts))[:62]
    )
)
def test_names_file_name_differs_for_different_valid_uids(uid: str) -> None:
    a = relative_path(_header({"SOPInstanceUID": uid}), "{patient}")
    b = relative_path(_header({"SOPInstanceUID": uid + "1"}), "{patient}")
    assert a != b

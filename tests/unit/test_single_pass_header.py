"""The receiver's single-pass fast paths give exactly what the old slow paths gave.

The receiver used to check a received file with ``integrity.find_defect`` and then
read its header with ``dicomtags.read_header`` (pydicom). It now walks the object
once with ``integrity.examine`` (from the file or from the bytes still in memory)
and builds the header from the raw values with ``dicomtags.header_from_elements``;
``StoreHandler`` remembers the folder of each series under the raw header values;
``dicomtags.safe_component`` returns plain ASCII names without the full cleaning.
Each test here compares a fast path with the slow path it replaced, on many
kinds of objects (explicit, implicit, big endian, encapsulated, RT with
sequences, non-ASCII character sets, truncated and deflated files).
"""

from __future__ import annotations

import shutil
import string
import struct
import time
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid

from dicomnode.config import DEFAULT_LAYOUT, ReceiverConfig
from dicomnode.dicomtags import (
    HEADER_TAG_NUMBERS,
    HEADER_TAGS,
    _sanitise,
    header_from_elements,
    read_header,
    safe_component,
    text_of,
)
from dicomnode.integrity import examine, find_defect
from dicomnode.organise import file_name, folder_plan, relative_path
from dicomnode.receiver import store as storemod
from dicomnode.receiver.store import ReceivedObject, StoreHandler
from tests.factories import ROOT, bundled, make_image, rt_set, save
from tests.integration.rawpeer import encode_dataset

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
NAME_UTF8 = "Müller^Jürgen"
#: The UTF-8 bytes of NAME_UTF8 read as ISO 8859-1: same raw bytes, other text.
NAME_UTF8_AS_LATIN1 = NAME_UTF8.encode("utf-8").decode("latin-1")


# --------------------------------------------------------------------------- helpers


def _texts(ds: Dataset) -> dict[str, str]:
    """Return text_of for every header keyword (pydicom may warn about odd values)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {kw: text_of(ds, kw) for kw in HEADER_TAGS}


def _old_header(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_header(path)


def _charset_file(name: str) -> Path:
    found = get_charset_files(name)
    if not found:
        pytest.skip(f"pydicom has no charset file {name}")
    return Path(found[0])


def _with_syntax(ds: Dataset, syntax: str) -> Dataset:
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _named(charset: str, name: str, **more: str) -> Dataset:
    ds = make_image(patient_name="X")
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    for keyword, value in more.items():
        setattr(ds, keyword, value)
    return ds


#: Generated objects: name -> data set builder.
GENERATED: dict[str, Callable[[], Dataset]] = {
    "ct": make_image,
    "mr": lambda: make_image("MR"),
    "ct-implicit": lambda: _with_syntax(make_image(), IMPLICIT_LE),
    "ct-big-endian": lambda: _with_syntax(make_image(), EXPLICIT_BE),
    "rtstruct": lambda: rt_set()["rtstruct"],
    "rtplan": lambda: rt_set()["rtplan"],
    "rtdose": lambda: rt_set()["rtdose"],
    "iso-ir-192": lambda: _named("ISO_IR 192", NAME_UTF8, StudyDescription="Kopf ärztlich"),
    "iso-ir-100": lambda: _named("ISO_IR 100", NAME_UTF8, SeriesDescription="Thorax café"),
    "iso-ir-100-implicit": lambda: _with_syntax(_named("ISO_IR 100", NAME_UTF8), IMPLICIT_LE),
    "iso-ir-144": lambda: _named("ISO_IR 144", "Иванов^Иван"),
    "odd-and-padded": lambda: _named("ISO_IR 192", "Ö", SeriesDescription=" padded  "),
}

BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_padded.dcm",
    "MR_small_RLE.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "JPEG2000.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "ExplVR_BigEnd.dcm",
    "SC_rgb_jpeg.dcm",  # implicit VR data set under an explicit transfer syntax
    "reportsi.dcm",
    "waveform_ecg.dcm",
]

CHARSETS = [
    "chrH31.dcm",
    "chrX1.dcm",
    "chrX2.dcm",
    "chrFren.dcm",
    "chrGerm.dcm",
    "chrRuss.dcm",
    "chrGreek.dcm",
    "chrArab.dcm",
    "chrHbrw.dcm",
    "chrI2.dcm",
    "chrJapMulti.dcm",
    "chrKoreanMulti.dcm",
]

ALL_CASES = (
    [f"gen:{name}" for name in GENERATED]
    + [f"file:{name}" for name in BUNDLED]
    + [f"charset:{name}" for name in CHARSETS]
)


def materialise(case: str, folder: Path) -> Path:
    """Return a Part 10 file for ``case`` (generated, bundled or charset), inside ``folder``."""
    kind, name = case.split(":", 1)
    target = folder / (name.replace(".dcm", "") + ".dcm")
    if kind == "gen":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rt_set re-keys pydicom's odd example files
            return save(GENERATED[name](), target)
    source = bundled(name) if kind == "file" else _charset_file(name)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def _part10(payload: bytes, syntax: str = EXPLICIT_LE) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = ROOT + "1"
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return bytes(fp.getvalue()) + payload


# ------------------------------------------------------- 1. one walk == two reads


@pytest.mark.parametrize("case", ALL_CASES)
def test_single_pass_header_equals_read_header(case: str, tmp_path: Path) -> None:
    path = materialise(case, tmp_path)
    data = path.read_bytes()
    exam = examine(path, HEADER_TAG_NUMBERS)

    assert exam.defect is None, exam.defect
    assert find_defect(path) is None
    assert exam.elements, "nothing walked: the comparison below would be empty"
    for source in (data, bytearray(data), memoryview(data)):
        assert examine(source, HEADER_TAG_NUMBERS) == exam, type(source).__name__

    old = _old_header(path)
    new = header_from_elements(exam.elements, exam.implicit, exam.little)
    assert set(map(int, old.keys())) == set(exam.elements)
    old_texts, new_texts = _texts(old), _texts(new)
    assert new_texts == old_texts
    assert old_texts["SOPInstanceUID"], "the old header read nothing"


@pytest.mark.parametrize(
    ("case", "expected_name"),
    [
        ("gen:iso-ir-192", NAME_UTF8),
        ("gen:iso-ir-100", NAME_UTF8),
        ("gen:iso-ir-100-implicit", NAME_UTF8),
        ("gen:iso-ir-144", "Иванов^Иван"),
    ],
)
def test_single_pass_header_decodes_non_ascii_names(
    case: str, expected_name: str, tmp_path: Path
) -> None:
    path = materialise(case, tmp_path)
    exam = examine(path, HEADER_TAG_NUMBERS)
    new = header_from_elements(exam.elements, exam.implicit, exam.little)
    assert text_of(new, "PatientName") == expected_name == text_of(read_header(path), "PatientName")


def test_single_pass_header_charset_file_names_are_really_non_ascii(tmp_path: Path) -> None:
    """Guard: the charset files used above do exercise decoding beyond ASCII."""
    for name in ("chrH31.dcm", "chrX1.dcm", "chrFren.dcm"):
        path = materialise(f"charset:{name}", tmp_path)
        exam = examine(path, HEADER_TAG_NUMBERS)
        new_name = text_of(
            header_from_elements(exam.elements, exam.implicit, exam.little), "PatientName"
        )
        assert not new_name.isascii(), (name, new_name)
        assert new_name == text_of(read_header(path), "PatientName")


def test_single_pass_header_deflated_object_is_walked_by_bounded_inflation(
    tmp_path: Path,
) -> None:
    path = materialise("file:image_dfl.dcm", tmp_path)
    exam = examine(path, HEADER_TAG_NUMBERS)
    assert exam.syntax == "1.2.840.10008.1.2.1.99"
    assert exam.deflated
    assert exam.defect is None
    assert find_defect(path) is None
    assert examine(path.read_bytes(), HEADER_TAG_NUMBERS) == exam
    # The header comes from the streamed inflation, the same values pydicom reads.
    ours = header_from_elements(exam.elements, exam.implicit, exam.little)
    theirs = read_header(path)
    for keyword in ("SOPInstanceUID", "SOPClassUID", "Modality", "PatientName"):
        assert text_of(ours, keyword) == text_of(theirs, keyword), keyword
    assert text_of(ours, "SOPInstanceUID")


@pytest.mark.parametrize("where", ["duplicate after PixelData", "only after FloatPixelData"])
def test_single_pass_header_element_after_pixel_data(where: str, tmp_path: Path) -> None:
    """Non-conformant order: a header element placed after (7FE0,0010)/(7FE0,0008)."""
    late_name = struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 8) + b"Late^Bob"
    if where == "duplicate after PixelData":
        payload = encode_dataset(make_image(patient_name="Doe^John")) + late_name
    else:
        float_pixels = struct.pack("<HH2s2xL", 0x7FE0, 0x0008, b"OF", 4) + b"\x00" * 4
        payload = float_pixels + late_name
    path = tmp_path / "late.dcm"
    path.write_bytes(_part10(payload))
    exam = examine(path, HEADER_TAG_NUMBERS)
    assert exam.defect is None
    new = header_from_elements(exam.elements, exam.implicit, exam.little)
    assert text_of(new, "PatientName") == text_of(read_header(path), "PatientName")


# ------------------------------------------------------------ 2. truncated objects


def _pixel_offset(data: bytes) -> int:
    for tag in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"):
        at = data.rfind(tag)
        if at != -1:
            return at
    raise AssertionError("no pixel data tag")


def _cut_points(case: str, data: bytes, sop_uid: str) -> dict[str, int]:
    uid_at = data.rfind(sop_uid.encode("ascii"))
    assert uid_at > 132
    points = {
        "preamble": 100,
        "file meta": 140,
        "header value": uid_at + len(sop_uid) // 2,
        "last byte": len(data) - 1,
    }
    if case != "gen:rtplan":
        pixels = _pixel_offset(data)
        points["pixel element header"] = pixels + 5
        points["pixel data"] = (pixels + len(data)) // 2
    else:
        beams = data.find(b"\x0a\x30\xb0\x00")  # (300A,00B0) Beam Sequence, implicit VR LE
        assert beams != -1
        points["inside a sequence"] = beams + 60
    return points


TRUNCATED_CASES = [
    "gen:ct",
    "gen:ct-implicit",
    "gen:ct-big-endian",
    "gen:rtplan",
    "file:JPEG2000.dcm",
    "file:MR_small_bigendian.dcm",
]


@pytest.mark.parametrize("case", TRUNCATED_CASES)
def test_single_pass_truncated_objects_have_the_same_defect(case: str, tmp_path: Path) -> None:
    whole = materialise(case, tmp_path)
    data = whole.read_bytes()
    sop_uid = text_of(read_header(whole), "SOPInstanceUID")
    for where, cut in _cut_points(case, data, sop_uid).items():
        part = data[:cut]
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(part)
        by_path = examine(path, HEADER_TAG_NUMBERS)
        by_bytes = examine(part, HEADER_TAG_NUMBERS)
        assert by_path.defect is not None, f"{case} cut at {cut} ({where}) not detected"
        assert by_path.defect == by_bytes.defect == find_defect(path), (where, cut)
        assert by_path.elements == by_bytes.elements == {}, (where, cut)


# ------------------------------------------------------ 3. folder cache per series


def _store_objects(folder: Path) -> list[Path]:
    """Objects of one series, then objects differing from it in one folder value each."""
    study, series = generate_uid(ROOT), generate_uid(ROOT)

    def base(instance: int = 9, **values: str) -> Dataset:
        ds = make_image(study_uid=study, series_uid=series, instance=instance)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return ds

    datasets: list[tuple[str, Dataset]] = [(f"same{i}", base(i)) for i in (1, 2, 3)]
    datasets += [
        ("name", base(PatientName="OTHER^PERSON")),
        ("series-description", base(SeriesDescription="Another description")),
        ("patient-id", base(PatientID="PAT002")),
        ("study-description", base(StudyDescription="Another study")),
        ("study-date", base(StudyDate="20250505")),
        ("series-number", base(SeriesNumber=7)),
        ("modality", base(Modality="PT")),
        ("implicit", _with_syntax(base(), IMPLICIT_LE)),
        ("big-endian", _with_syntax(base(), EXPLICIT_BE)),
        ("utf8-name", base(SpecificCharacterSet="ISO_IR 192", PatientName=NAME_UTF8)),
        # Same raw PatientName bytes as "utf8-name", decoded under another character set.
        ("latin1-name", base(SpecificCharacterSet="ISO_IR 100", PatientName=NAME_UTF8_AS_LATIN1)),
        ("back-to-same", base(4)),
    ]
    paths = [save(ds, folder / f"{i:02d}-{label}.dcm") for i, (label, ds) in enumerate(datasets)]
    rt = rt_set(study_uid=study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths += [save(ds, folder / f"rt-{name}.dcm") for name, ds in rt.items()]
    shutil.copyfile(bundled("image_dfl.dcm"), folder / "deflated.dcm")
    paths.append(folder / "deflated.dcm")
    return paths


def _first_named_path(
    header: Dataset, layout: str, first_names: dict[tuple[PurePosixPath, str], str]
) -> PurePosixPath:
    """The reference model of filing: each folder level keeps the name its first object gave it."""
    folder = PurePosixPath()
    for level in folder_plan(header, layout):
        name = first_names.setdefault((folder, level.tag or "/" + level.name), level.name)
        folder = folder / name
    return folder / file_name(header)


def _feed(root: Path, layout: str, content_mode: str) -> tuple[StoreHandler, list[str]]:
    """Store every object; return the handler and a list of misplaced objects."""
    dest = root / "dest"
    tmp = dest / ".incoming-tmp"
    tmp.mkdir(parents=True)
    cfg = ReceiverConfig(destination_dir=dest, min_free_space_mb=0, folder_layout=layout)
    handler = StoreHandler(cfg)
    incoming = dest / "incoming"
    problems: list[str] = []
    expected_all: set[Path] = set()
    first_names: dict[tuple[PurePosixPath, str], str] = {}
    for original in _store_objects(root / "src"):
        expected = incoming / _first_named_path(
            _old_header(original), cfg.folder_layout, first_names
        )
        expected_all.add(expected)
        received = tmp / f"{original.stem}.part"
        shutil.copyfile(original, received)
        data = original.read_bytes()
        content = {"none": None, "bytes": data, "bytearray": bytearray(data)}[content_mode]
        uid = text_of(_old_header(original), "SOPInstanceUID")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status = handler.finish(
                ReceivedObject(
                    received, "SCANNER", "127.0.0.1:1", time.monotonic(), uid, content=content
                )
            ).status
        assert status == 0x0000, f"{original.name}: 0x{status:04X}"
        if not expected.is_file():
            found = sorted(str(p.relative_to(incoming)) for p in incoming.rglob(expected.name))
            problems.append(
                f"{original.name}: expected {expected.relative_to(incoming)}, at {found}"
            )
        elif expected.read_bytes() != data:
            problems.append(f"{original.name}: stored bytes differ")
    stored = set(incoming.rglob("*.dcm"))
    if stored != expected_all:
        problems.append(f"unexpected files: {sorted(map(str, stored ^ expected_all))}")
    return handler, problems


LAYOUTS = [DEFAULT_LAYOUT, "{patient_id}/{modality}_{series_number}/{patient}_{study_date}"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("content_mode", ["none", "bytes", "bytearray"])
def test_single_pass_store_folder_cache_files_where_the_old_path_did(
    tmp_path: Path, layout: str, content_mode: str
) -> None:
    handler, problems = _feed(tmp_path, layout, content_mode)
    assert problems == []
    assert handler._plans, "the folder cache was never used"


def test_single_pass_store_folder_cache_is_hit_within_a_series(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / ".incoming-tmp").mkdir(parents=True)
    handler = StoreHandler(ReceiverConfig(destination_dir=dest, min_free_space_mb=0))
    study, series = generate_uid(ROOT), generate_uid(ROOT)
    for instance in (1, 2, 3):
        received = save(
            make_image(study_uid=study, series_uid=series, instance=instance),
            dest / ".incoming-tmp" / f"{instance}.part",
        )
        assert (
            handler.finish(
                ReceivedObject(received, "SCANNER", "127.0.0.1:1", time.monotonic(), "")
            ).status
            == 0
        )
    assert len(handler._plans) == 1
    assert len(list((dest / "incoming").rglob("*.dcm"))) == 3


def test_single_pass_store_fixture_objects_differ_only_in_the_varied_value(tmp_path: Path) -> None:
    """Guard: "utf8-name" and "latin1-name" share raw PatientName bytes, not their folders."""
    paths = {p.stem.split("-", 1)[1]: p for p in _store_objects(tmp_path) if p.stem[:2].isdigit()}
    utf8 = examine(paths["utf8-name"], HEADER_TAG_NUMBERS).elements
    latin1 = examine(paths["latin1-name"], HEADER_TAG_NUMBERS).elements
    assert utf8[0x00100010] == latin1[0x00100010]
    assert utf8[0x00080005] != latin1[0x00080005]
    folders = {
        label: relative_path(read_header(p), DEFAULT_LAYOUT).parent for label, p in paths.items()
    }
    assert folders["same1"] == folders["same2"] == folders["same3"] == folders["back-to-same"]
    for label in ("name", "utf8-name", "latin1-name", "series-description", "patient-id"):
        assert folders[label] != folders["same1"], label
    assert folders["utf8-name"] != folders["latin1-name"]


# Descriptive values (PatientName, SeriesDescription, their character set) only name a
# folder that does not exist yet; the identity values decide where an object goes.
@pytest.mark.parametrize(
    "ignored_tag",
    [
        pytest.param(0x00100020, id="PatientID"),
    ],
)
def test_single_pass_store_check_catches_a_cache_key_that_ignores_a_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ignored_tag: int
) -> None:
    """Mutation check: with a too-coarse cache key the comparison above must report misfiling."""
    monkeypatch.setattr(storemod, "_PER_INSTANCE_TAGS", storemod._PER_INSTANCE_TAGS | {ignored_tag})
    _, problems = _feed(tmp_path, DEFAULT_LAYOUT, "bytes")
    assert problems, "a cache key without this value went unnoticed"


# ------------------------------------------------------ 4. safe_component fast path

RESERVED = ["CON", "con", "NUL", "nul", "COM1", "com1", "LPT9", "AUX", "PRN", "con.txt", "NUL.dcm"]
UID_64 = (ROOT + "1234567890" * 7)[:64]
PLAIN_ALPHABET = string.ascii_letters + string.digits + ".-_ "

names = st.one_of(
    st.text(alphabet=PLAIN_ALPHABET, max_size=90),
    st.text(alphabet=string.ascii_letters + string.digits + ".-", min_size=1, max_size=70),
    st.sampled_from(RESERVED),
    st.tuples(st.sampled_from(RESERVED), st.text(alphabet=PLAIN_ALPHABET, max_size=8)).map("".join),
)


@example(text="1" * 64, max_len=64)
@example(text="1" * 64, max_len=16)
@example(text="COM1.x", max_len=16)
@given(text=names, max_len=st.sampled_from([16, 64]))
def test_single_pass_safe_component_fast_path_equals_full_cleaning(text: str, max_len: int) -> None:
    assert safe_component(text, "X", max_len) == _sanitise(text, "X", max_len)


@pytest.mark.parametrize("max_len", [16, 64])
@pytest.mark.parametrize(
    "text",
    [
        UID_64,
        "9" * 64,
        "9" * 65,
        "CON",
        "con",
        "nul.dcm",
        "COM1",
        "con.txt",
        "CONSOLE",
        "a.",
        ".a",
        "-x-",
        "a..b",
        "a-b.c",
        "A" * 201,
        "",
    ],
)
def test_single_pass_safe_component_examples(text: str, max_len: int) -> None:
    assert safe_component(text, "X", max_len) == _sanitise(text, "X", max_len)


def test_single_pass_file_shrinking_during_the_walk_is_a_defect_not_a_crash(
    tmp_path: Path,
) -> None:
    """A file another process truncates while it is walked ends the walk as a defect.

    (Through a memory map the same truncation would kill the process with SIGBUS,
    so only the receiver's private temp files are walked that way.)
    """
    from dicomnode import integrity

    path = tmp_path / "shrinking.dcm"
    data = _part10(encode_dataset(make_image(patient_name="Doe^John")))
    path.write_bytes(data)
    with path.open("rb") as fh:
        path.write_bytes(data[: len(data) // 2])  # truncated after its size was taken
        exam = integrity._examine(integrity._FileView(fh), len(data), HEADER_TAG_NUMBERS)
    assert exam.defect is not None
    assert examine(path, HEADER_TAG_NUMBERS) == examine(path, HEADER_TAG_NUMBERS, private=True)

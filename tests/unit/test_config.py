"""Configuration: the original's file loads unchanged; every bad value gets one clear error."""

from __future__ import annotations

import re
from pathlib import Path, PureWindowsPath

import pytest

from dicomnode import config
from dicomnode.errors import ConfigError
from dicomnode.receiver import policy

DATA = Path(__file__).resolve().parents[1] / "data"
REPO = Path(__file__).resolve().parents[2]


def test_config_original_readme_file_loads_unchanged() -> None:
    cfg = config.load(DATA / "original_config.ini")
    rc, fw = cfg.receiver, cfg.forwarder
    assert rc.ae_title == "FOLLOW"
    assert cfg.window_title == "FOLLOW-Deamon"
    assert rc.receive_port == 1335
    assert rc.server_ip == "192.168.178.55"
    assert str(rc.destination_dir) == "D:\\IncomingFollow"
    assert rc.trusted_ae_titles == (
        "MRMULTI",
        "TR_SEND",
        "VARIAN",
        "MYQASRS",
        "RTPLANNING",
        "TRUSTED_AE_2",
    )
    mappings = dict(rc.ae_mappings)
    assert str(mappings["MYQASRS"]) == "\\\\network\\iba_SRS"
    assert PureWindowsPath(str(mappings["zCTSCANNER"])).name == "incoming_ctscanner"
    assert str(cfg.tools.emf2sf_path) == "C:\\dcm4che\\bin"
    # The original's semantics: emf2sf only when the path points at something usable.
    assert cfg.tools.enhanced_mr_conversion == "off"
    assert str(fw.watch_folder) == "D:\\Incoming2Send"
    assert (fw.target_aet, fw.target_ip, fw.target_port) == (
        "DICOM-RT-KAFFEE",
        "192.168.178.55",
        1334,
    )
    assert fw.max_workers == 4
    assert fw.heartbeat_interval == 120
    assert fw.process_timer_interval == 10
    assert fw.inactivity_timeout == 1
    assert fw.calling_aet == "FOLLOW"
    assert cfg.logging.verbose is True


def test_config_example_file_loads_and_has_every_original_key() -> None:
    cfg = config.load(REPO / "config.example.ini")
    assert cfg.tools.enhanced_mr_conversion == "native"
    original = (DATA / "original_config.ini").read_text()
    example = (REPO / "config.example.ini").read_text()
    for line in original.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key = line.split("=")[0].strip()
            assert f"\n{key} =" in example, key


def test_config_embedded_default_is_loopback_and_trusts_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None)
    assert cfg.receiver.ae_title == "DICOMNODE"
    assert (cfg.receiver.server_ip, cfg.receiver.receive_port) == ("127.0.0.1", 11112)
    assert cfg.receiver.trusts_any_ae
    assert cfg.receiver.destination_dir == tmp_path / "dicomnode-data" / "received"
    assert cfg.forwarder.watch_folder == tmp_path / "dicomnode-data" / "outgoing"
    assert not cfg.forwarder.has_target
    assert cfg.tools.enhanced_mr_conversion == "native"


def test_config_find_prefers_explicit_then_cwd(tmp_path: Path) -> None:
    assert config.find_config(None, tmp_path) is None
    (tmp_path / "config.ini").write_text("[General]\n")
    assert config.find_config(None, tmp_path) == tmp_path / "config.ini"
    with pytest.raises(ConfigError, match="not found"):
        config.find_config(tmp_path / "missing.ini", tmp_path)


BASE = "[Security]\ntrusted_ae_titles = A\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[Network]\nreceive_port = abc\n",
            r"\[Network\] receive_port = 'abc' is invalid; accepted: a whole number from 1 to 65535",
        ),
        ("[Network]\nreceive_port = 0\n", r"receive_port = '0'"),
        ("[Network]\nreceive_port = 70000\n", r"receive_port = '70000'"),
        (
            "[FolderWatcher]\ninactivity_timeout = -1\n",
            r"\[FolderWatcher\] inactivity_timeout = '-1' is invalid; accepted: a number of seconds",
        ),
        ("[FolderWatcher]\nheartbeat_interval = soon\n", r"heartbeat_interval = 'soon'"),
        ("[FolderWatcher]\nmax_workers = 0\n", r"max_workers = '0'"),
        (
            "[General]\nae_title = THIS_IS_SEVENTEEN\n",
            r"\[General\] ae_title = 'THIS_IS_SEVENTEEN' is invalid; accepted: 1-16 characters",
        ),
        ("[General]\nae_title = BAD\\AE\n", r"ae_title = 'BAD\\\\AE'"),
        (
            "[Security]\ntrusted_ae_titles = OK,WAY_TOO_LONG_AE_TITLE\n",
            r"trusted_ae_titles = 'WAY_TOO_LONG_AE_TITLE'",
        ),
        ("[Security]\ntrusted_ae_titles =\n", r"trusted_ae_titles is empty"),
        (
            "[General]\nae_titel = X\n",
            r"\[General\] unknown key 'ae_titel'; accepted keys: ae_title, stop_grace_s, window_title",
        ),
        ("[Netwrok]\nreceive_port = 1\n", r"unknown section \[Netwrok\]"),
        ("[Logging]\nverbose = maybe\n", r"verbose = 'maybe' is invalid; accepted: true or false"),
        ("[Tools]\nenhanced_mr_conversion = fast\n", r"accepted: native \| emf2sf \| off"),
        ("[FolderWatcher]\ntarget_ip = 10.0.0.1\n", r"target_aet is empty"),
        ("[FolderWatcher]\nsend_order = RTDOSE, CT\n", r"send_order = 'RTDOSE, CT'"),
        ("[Directories]\nfolder_layout = {patient}/../{series}\n", r"folder_layout"),
        ("[Directories]\nfolder_layout = {nope}\n", r"folder_layout = '\{nope\}'"),
        (
            "[AE_Mappings]\nTHIS_IS_SEVENTEEN = x\n",
            r"\[AE_Mappings\] 'THIS_IS_SEVENTEEN' is not a valid AE title",
        ),
        ("[Network]\nserver_ip = not an ip!\n", r"server_ip = 'not an ip!'"),
        ("[Network]\nreceiver_transport = dcmtk\n", r"accepted: lean \| pynetdicom"),
        ("[TLS]\nenabled = true\n", r"needs certificate and private_key"),
        ("not an ini file\n", r"not a valid INI file"),
    ],
)
def test_config_invalid_value_gives_one_clear_error(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "bad.ini"
    body = text if "trusted_ae_titles" in text or "[" not in text else BASE + text
    path.write_text(body)
    with pytest.raises(ConfigError, match=expected) as info:
        config.load(path)
    message = str(info.value)
    assert str(path.resolve()) in message or "bad.ini" in message
    assert "\n" not in message


def test_config_inline_comments_and_case_insensitive_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.ini"
    path.write_text(
        "[General]\nAE_Title = NODE1 ; semicolon comment\n[Security]\ntrusted_ae_titles = Scanner_1 , PACS # x\n"
    )
    cfg = config.load(path)
    assert cfg.receiver.ae_title == "NODE1"
    assert cfg.receiver.trusted_ae_titles == ("Scanner_1", "PACS")


def test_config_relative_paths_resolve_against_file_folder(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = sub / "c.ini"
    path.write_text(
        BASE + "[Directories]\ndestination_dir = data\n[AE_Mappings]\nA = mapped\nB = /abs/b\n"
        "[FolderWatcher]\nwatch_folder = out\n"
    )
    cfg = config.load(path)
    assert cfg.receiver.destination_dir == sub / "data"
    assert policy.route_for(cfg.receiver, "A") == sub / "data" / "mapped"
    assert policy.route_for(cfg.receiver, "B") == Path("/abs/b")
    assert policy.route_for(cfg.receiver, "OTHER") == sub / "data" / "incoming"
    assert cfg.forwarder.watch_folder == sub / "out"


def test_config_send_order_partial_list_is_completed(tmp_path: Path) -> None:
    path = tmp_path / "c.ini"
    path.write_text(BASE + "[FolderWatcher]\nsend_order = RTSTRUCT, IMAGES\n")
    order = config.load(path).forwarder.send_order
    assert order[:2] == ("RTSTRUCT", "IMAGES")
    assert set(order) == set(config.DEFAULT_SEND_ORDER)


def test_config_emf2sf_semantics_when_key_absent(tmp_path: Path) -> None:
    tool = tmp_path / "bin"
    tool.mkdir()
    path = tmp_path / "c.ini"
    path.write_text(BASE + f"[Tools]\nemf2sf_path = {tool}\n")
    assert config.load(path).tools.enhanced_mr_conversion == "emf2sf"
    path.write_text(BASE + "[Tools]\nemf2sf_path =\n")
    assert config.load(path).tools.enhanced_mr_conversion == "off"


def test_config_describe_lists_every_section() -> None:
    lines = config.describe(config.load(DATA / "original_config.ini"))
    text = "\n".join(lines)
    for section in (
        "[General]",
        "[Network]",
        "[Directories]",
        "[Security]",
        "[AE_Mappings]",
        "[Tools]",
        "[FolderWatcher]",
        "[Logging]",
    ):
        assert section in text
    assert "trusted_ae_titles = MRMULTI, TR_SEND" in text


def _example_sections() -> dict[str, dict[str, str]]:
    """Return config.example.ini's keys per section, commented-out ``# key = value`` lines included."""
    found: dict[str, dict[str, str]] = {}
    section = ""
    for line in (REPO / "config.example.ini").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = config.section_family(stripped[1:-1])
            found[section] = {}
            continue
        body = stripped.lstrip("#").strip()
        if "=" not in body or not section:
            continue
        key, _, value = body.partition("=")
        key = key.strip()
        if re.fullmatch(r"[a-z_0-9]+", key):
            found[section].setdefault(key, value.split(" #")[0].strip())
    return found


def test_config_example_shows_every_declared_key_with_its_default() -> None:
    example = _example_sections()
    for section, key, field_, spec, _cls in config.all_keys():
        if section in config.FREE_FORM_SECTIONS:
            assert section in example, section
            continue
        assert key in example.get(section, {}), f"config.example.ini lacks [{section}] {key}"
        if not spec.site_specific:
            shown = example[section][key]
            assert shown == config.default_text(field_, spec), (
                f"config.example.ini shows [{section}] {key} = {shown!r}; "
                f"declared default is {config.default_text(field_, spec)!r}"
            )


def test_config_readme_reference_table_matches_declarations() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- config-reference:start -->")
    end = readme.index("<!-- config-reference:end -->")
    table = [line for line in readme[start:end].splitlines()[1:] if line.strip()]
    expected = config.reference_table()
    assert table == expected, "regenerate with: .venv/bin/python -m dicomnode.config\n" + "\n".join(
        expected
    )


def test_config_check_config_lists_every_declared_key() -> None:
    text = "\n".join(config.describe(config.load(REPO / "config.example.ini")))
    for section, key, _f, _spec, _cls in config.all_keys():
        shown = {
            config.DESTINATION_SECTION: "[Destination:MODALITY1]",
            config.ROUTE_SECTION: "[Route:plans-to-qa]",
        }.get(section, section)
        assert shown in text if shown.startswith("[") else f"[{section}]" in text
        if section not in config.FREE_FORM_SECTIONS:
            assert f"\n{key} = " in text, key


def test_config_unknown_key_lists_the_declared_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.ini"
    path.write_text(BASE + "[FolderWatcher]\nretry_delay = 5\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    declared = sorted(k for s, k, *_ in config.all_keys() if s == "FolderWatcher")
    assert f"accepted keys: {', '.join(declared)}" in str(info.value)


def test_config_colon_separates_only_without_a_later_equals(tmp_path: Path) -> None:
    """``key: value`` (configparser's other delimiter) loads; ``tag:Keyword = glob`` is one key."""
    path = tmp_path / "c.ini"
    path.write_text(
        "[General]\nAE_Title: NODE1\n[Security]\ntrusted_ae_titles: CT1\n"
        "[FolderWatcher]\ntarget_aet: PACS\ntarget_ip = 127.0.0.1\n"
        "[Route:qa]\ndestinations = default\ntag:StudyDescription = *QA*, *phantom*\n"
    )
    cfg = config.load(path)
    assert cfg.receiver.ae_title == "NODE1"
    assert cfg.forwarder.target_aet == "PACS"
    (route,) = cfg.forwarder.routes
    assert route.tags == (("StudyDescription", ("*QA*", "*phantom*")),)


def test_config_two_destinations_with_one_ae_title_are_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.ini"
    path.write_text(
        "[Security]\ntrusted_ae_titles = CT1\n"
        "[Destination:TPS]\nae_title = STORESCP\nhost = 127.0.0.1\nport = 1\n"
        "[Destination:RV]\nae_title = STORESCP\nhost = 127.0.0.1\nport = 2\n"
    )
    with pytest.raises(ConfigError, match=r"\[Destination:RV\].*\[Destination:TPS\].*own AE title"):
        config.load(path)

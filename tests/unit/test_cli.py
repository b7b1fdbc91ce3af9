"""CLI parsing, exit codes and one-line errors (in-process, no sockets)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode import cli
from dicomnode.status import ExitStatus

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"


def test_cli_parser_keeps_original_flags() -> None:
    args = cli.build_parser().parse_args(
        ["--config", "x.ini", "--watch-folder", "w", "--no-receiver", "-v"]
    )
    assert args.config == Path("x.ini")
    assert args.watch_folder == Path("w")
    assert args.no_receiver and args.verbose and not args.no_watcher
    assert args.command is None


def test_cli_subcommands_accept_config_after_name() -> None:
    args = cli.build_parser().parse_args(["check-config", "--config", "c.ini"])
    assert (args.command, args.config) == ("check-config", Path("c.ini"))
    args = cli.build_parser().parse_args(["echo", "h", "104", "--call", "PACS", "--aet", "ME"])
    assert (args.host, args.port, args.call, args.aet) == ("h", 104, "PACS", "ME")


@pytest.mark.parametrize(
    "argv", [["echo", "h", "abc"], ["echo", "h", "104", "--call", "X" * 17], ["--bogus"]]
)
def test_cli_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage" in capsys.readouterr().err


def test_cli_check_config_prints_effective_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(["check-config", "--config", str(DATA / "original_config.ini")]) == ExitStatus.OK
    )
    out = capsys.readouterr().out
    assert "ae_title = FOLLOW" in out
    assert "target_aet = DICOM-RT-KAFFEE" in out


def test_cli_bad_config_is_one_line_error_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.ini"
    bad.write_text("[Network]\nreceive_port = abc\n[Security]\ntrusted_ae_titles = A\n")
    assert cli.main(["check-config", "--config", str(bad)]) == ExitStatus.CONFIG_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "receive_port" in err and "Traceback" not in err


def test_cli_missing_config_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--config", str(tmp_path / "nope.ini")]) == ExitStatus.CONFIG_ERROR
    assert "not found" in capsys.readouterr().err


def test_cli_nothing_to_run_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--no-receiver", "--no-watcher"]) == ExitStatus.CONFIG_ERROR


def test_cli_echo_unreachable_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    from tests.conftest import free_port

    assert cli.main(["echo", "127.0.0.1", str(free_port()), "--timeout", "2"]) == ExitStatus.FAILURE
    captured = capsys.readouterr()
    out = captured.out.strip()
    assert out.startswith("ECHO-FAILED") and out.count("\n") == 0
    assert "pynetdicom" not in captured.err  # the library's own ERROR lines stay quiet


@pytest.mark.parametrize("entry", [["-m", "dicomnode"], [str(REPO / "DICOMnode.py")]])
def test_cli_entry_points_show_help(entry: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, *entry, "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "--watch-folder" in proc.stdout and "--no-receiver" in proc.stdout


def test_cli_bad_config_via_python_m_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "config.ini"
    bad.write_text(
        "[General]\nae_title = FAR_TOO_LONG_TITLE_X\n[Security]\ntrusted_ae_titles = A\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dicomnode"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "[General] ae_title" in proc.stderr

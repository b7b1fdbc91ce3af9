"""Run dcm4che's ``emf2sf`` on one Enhanced object, writing its outputs into a folder.

The optional conversion backend (``[Tools] enhanced_mr_conversion = emf2sf``). The
tool is started without a shell, with a time limit, and can be cancelled; a failure
raises :class:`~dicomnode.errors.ConversionError` with the reason and the tool's last
output lines. Placing the outputs is :mod:`dicomnode.convert.worker`'s job. Imports
the standard library and :mod:`dicomnode.errors`.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from dicomnode.errors import ConversionError

logger = logging.getLogger(__name__)

_IS_WINDOWS: Final = sys.platform == "win32"
#: Executable names tried inside a dcm4che folder, in order.
EXECUTABLE_NAMES: Final = ("emf2sf.bat", "emf2sf.cmd", "emf2sf") if _IS_WINDOWS else ("emf2sf",)
_POLL_S: Final = 0.1
_TAIL_LINES: Final = 5
_CMD_META: Final = re.compile(r'[&|<>^%!"\r\n]')


class Emf2sfCancelled(ConversionError):
    """The run was stopped because the node is shutting down."""


def find_executable(emf2sf_path: Path | None) -> Path:
    """Return the emf2sf executable named by ``[Tools] emf2sf_path``.

    Parameters
    ----------
    emf2sf_path : Path or None
        The executable itself, dcm4che's ``bin`` folder, or the dcm4che folder
        that contains ``bin``.

    Returns
    -------
    Path
        The executable (``emf2sf``, or ``emf2sf.bat`` on Windows).

    Raises
    ------
    ConversionError
        When no usable executable is found there.
    """
    if emf2sf_path is None:
        raise ConversionError("emf2sf_path is not configured")
    if emf2sf_path.is_file():
        return emf2sf_path
    if emf2sf_path.is_dir():
        for folder in (emf2sf_path, emf2sf_path / "bin"):
            for name in EXECUTABLE_NAMES:
                candidate = folder / name
                if candidate.is_file():
                    return candidate
    raise ConversionError(f"no emf2sf executable at {emf2sf_path}")


def run_emf2sf(
    executable: Path,
    source: Path,
    out_dir: Path,
    timeout_s: float,
    cancel: Callable[[], bool] | None = None,
) -> list[Path]:
    """Convert ``source`` with emf2sf into the empty folder ``out_dir``.

    Parameters
    ----------
    executable : Path
        From :func:`find_executable`.
    source : Path
        The Enhanced multi-frame file.
    out_dir : Path
        Existing, empty folder for the outputs (``--out-dir``).
    timeout_s : float
        The run is killed after this many seconds.
    cancel : callable, optional
        Polled while the tool runs; True kills it.

    Returns
    -------
    list of Path
        The files emf2sf wrote, sorted by name.

    Raises
    ------
    ConversionError
        When the tool cannot start, times out, exits non-zero or writes nothing.
    """
    command = [str(executable), "--out-dir", str(out_dir), str(source)]
    if _IS_WINDOWS and executable.suffix.lower() in (".bat", ".cmd"):
        unsafe = [arg for arg in command[2:] if _CMD_META.search(arg)]
        if unsafe:  # cmd.exe would interpret these characters (BatBadBut)
            raise ConversionError(f"path not safe to pass to {executable.name}: {unsafe[0]}")
    logger.debug("running %s", command)
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                shell=False,
                cwd=out_dir,
            )
        except OSError as exc:
            raise ConversionError(f"cannot start {executable}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout_s
        reason = ""
        while True:
            try:
                proc.wait(_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if cancel is not None and cancel():
                    reason = "cancelled"
                elif time.monotonic() > deadline:
                    reason = f"emf2sf timed out after {timeout_s:g} s"
                else:
                    continue
                proc.kill()
                proc.wait()
                break
        output.seek(0)
        tail = output.read().decode("utf-8", "replace").strip().splitlines()[-_TAIL_LINES:]
    if reason == "cancelled":
        raise Emf2sfCancelled("cancelled")
    if reason:
        raise ConversionError(reason)
    if proc.returncode != 0:
        raise ConversionError(
            f"emf2sf exited with {proc.returncode}: {' | '.join(tail) or 'no output'}"
        )
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    if not files:
        raise ConversionError(f"emf2sf wrote no files: {' | '.join(tail) or 'no output'}")
    return files

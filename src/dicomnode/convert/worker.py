"""Convert stored Enhanced objects in the background and place the classic series crash-safely.

The receiver calls :meth:`ConversionWorker.submit` after an object is durable. The
worker records a pending-job marker (``<ae_root>/.convert-pending/<hash>.json``),
converts on one background thread (native or emf2sf), writes the classic series into a
hidden staging folder on the same volume (``<ae_root>/.convert-tmp/``) and renames it
into the series folder below ``<ae_root>``, so a crash leaves the complete series or none; the
marker makes an interrupted job run again after a restart. :func:`convert_paths` is
the offline ``dicomnode convert`` command. Log verbs: ``CONVERTED``, ``CONVERT-FAILED``.
Imports pydicom, :mod:`dicomnode.config`, :mod:`dicomnode.organise`,
:mod:`dicomnode.dicomtags`, :mod:`dicomnode.storage` and its own package.

Length: about 670 lines: one crash-safe pipeline (stage, place, marker,
resume) and the offline command that runs the same steps; split, the
command would import every private step of the worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from struct import error as struct_error
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.config import ToolsConfig
from dicomnode.convert.emf2sf import Emf2sfCancelled, find_executable, run_emf2sf
from dicomnode.convert.native import CLASSIC_SOP_CLASS, NO_CLASSIC_TARGET, convert_dataset
from dicomnode.dicomtags import read_header, text_of
from dicomnode.errors import ConversionError
from dicomnode.ledger.events import EventKind, ledger_extra
from dicomnode.organise import FolderLevel, file_name, folder_plan
from dicomnode.storage import (
    CONVERT_PENDING_DIR,
    CONVERT_STAGING_DIR,
    FolderResolver,
    fsync_dir,
    fsync_file,
    write_bytes_atomic,
)

logger = logging.getLogger(__name__)

#: Hidden folder below an AE root holding one JSON marker per pending conversion.
PENDING_DIR: Final = CONVERT_PENDING_DIR
#: Hidden folder below an AE root where converted series are staged before the rename.
STAGING_DIR: Final = CONVERT_STAGING_DIR
_NO_TARGET_LINE: Final = "stored unconverted: no classic target"

Cancel = Callable[[], bool]


class ConversionCancelled(ConversionError):
    """The conversion was stopped by :meth:`ConversionWorker.stop`; its marker stays."""


@dataclass(frozen=True, slots=True)
class ConversionResult:
    """What one conversion produced.

    Attributes
    ----------
    source_uid : str
        SOP Instance UID of the Enhanced object.
    frames : int
        Number of classic objects written.
    folders : tuple of Path
        The series folder(s) they were placed in.
    """

    source_uid: str
    frames: int
    folders: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class _Job:
    stored_path: Path
    ae_root: Path
    marker: Path | None


# --------------------------------------------------------------------------- one conversion


def convert_file(
    source: Path,
    ae_root: Path,
    tools: ToolsConfig,
    layout: str,
    cancel: Cancel | None = None,
    staging_token: str = "",
    resolver: FolderResolver | None = None,
) -> ConversionResult:
    """Convert one stored Enhanced object and place its classic series under ``ae_root``.

    The series goes to ``ae_root / <folders of folder_plan(first, layout)> / file_name(ds)``,
    into the patient and study folders that already exist for its identity; it is
    written into ``ae_root/.convert-tmp`` first and renamed into place as a whole. If
    the series folder already exists (a re-send, or another object of the same
    series) the files are moved in one by one, each replacing its namesake.

    Parameters
    ----------
    source : Path
        The Enhanced object (left untouched).
    ae_root : Path
        Root of the output tree (the AE folder, or ``--out``).
    tools : ToolsConfig
        ``enhanced_mr_conversion == "emf2sf"`` selects the emf2sf backend, anything
        else the native converter.
    layout : str
        Folder layout template (``[Directories] folder_layout``).
    cancel : callable, optional
        Polled during the conversion; True stops it with :class:`ConversionCancelled`.
    staging_token : str
        Prefix of the staging folder, ``<pid>-<random>`` (lets a worker recognise
        its own and those of live sibling processes).
    resolver : FolderResolver, optional
        Finds the folders of an identity (a worker keeps one: it remembers them).

    Returns
    -------
    ConversionResult
        Source UID, frame count and output folder(s).

    Raises
    ------
    ConversionError
        The object cannot be read or converted, or emf2sf failed.
    OSError
        Writing or placing the series failed (disk full, permission).
    """
    token = staging_token or _staging_token()
    staging = ae_root / STAGING_DIR / f"{token}-{uuid.uuid4().hex[:12]}"
    series_tmp = staging / "series"
    try:
        series_tmp.mkdir(parents=True)
        if tools.enhanced_mr_conversion == "emf2sf":
            source_uid, headers = _stage_emf2sf(source, staging, series_tmp, tools, cancel)
        else:
            source_uid, headers = _stage_native(source, series_tmp, cancel)
        groups: dict[tuple[FolderLevel, ...], list[Path]] = {}
        for path, header in headers:
            groups.setdefault(folder_plan(header, layout), []).append(path)
        if cancel is not None and cancel():
            raise ConversionCancelled("cancelled")
        folders = []
        ordered = sorted(groups.items(), key=lambda item: [level.name for level in item[0]])
        for index, (plan, files) in enumerate(ordered):
            group_dir = series_tmp if len(groups) == 1 else staging / f"group{index}"
            if group_dir != series_tmp:
                group_dir.mkdir()
                for f in files:
                    os.replace(f, group_dir / f.name)
            folders.append(place_series(group_dir, ae_root, plan, resolver))
    finally:
        # The (hidden) staging and marker folders themselves stay: removing them
        # would race with sibling receiver processes creating entries in them.
        shutil.rmtree(staging, ignore_errors=True)
    frames = len(headers)
    logger.info(
        "CONVERTED sop_instance_uid=%s frames=%d backend=%s folder=%s",
        source_uid,
        frames,
        "emf2sf" if tools.enhanced_mr_conversion == "emf2sf" else "native",
        ", ".join(str(f) for f in folders),
        extra=ledger_extra(
            EventKind.CONVERTED,
            sop_uid=source_uid,
            path="\n".join(str(f) for f in folders),
            reason=f"{frames} frame(s)",
        ),
    )
    return ConversionResult(source_uid, frames, tuple(folders))


def _header(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom also logs them
        return read_header(path)


def _read_source(source: Path) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom also logs them
            return dcmread(source)
    except FileNotFoundError:
        raise ConversionError(f"{source} no longer exists") from None
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise ConversionError(f"cannot read {source}: {exc}") from None


def _stage_native(
    source: Path, series_tmp: Path, cancel: Cancel | None
) -> tuple[str, list[tuple[Path, Dataset]]]:
    src = _read_source(source)
    source_uid = text_of(src, "SOPInstanceUID")
    try:
        datasets = convert_dataset(src, cancel)
    except ConversionError as exc:
        if cancel is not None and cancel():
            raise ConversionCancelled("cancelled") from None
        raise ConversionError(str(exc)) from None
    del src
    staged: list[tuple[Path, Dataset]] = []
    for ds in datasets:
        if cancel is not None and cancel():
            raise ConversionCancelled("cancelled")
        path = series_tmp / file_name(ds)
        with path.open("wb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds.save_as(fh, enforce_file_format=True)
            except (ValueError, TypeError, struct_error) as exc:
                raise ConversionError(f"cannot encode frame {len(staged) + 1}: {exc}") from None
            fsync_file(fh)
        staged.append((path, ds))
    fsync_dir(series_tmp)
    return source_uid, staged


def _stage_emf2sf(
    source: Path, staging: Path, series_tmp: Path, tools: ToolsConfig, cancel: Cancel | None
) -> tuple[str, list[tuple[Path, Dataset]]]:
    try:
        source_uid = text_of(_header(source), "SOPInstanceUID")
    except FileNotFoundError:
        raise ConversionError(f"{source} no longer exists") from None
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise ConversionError(f"cannot read {source}: {exc}") from None
    out = staging / "emf2sf-out"
    out.mkdir()
    # emf2sf sees a fixed, harmless name: stored paths carry patient names, which a
    # Windows .bat would interpret (``&``, ``%``, ``^``).
    link = staging / "input.dcm"
    try:
        os.link(source, link)
    except OSError:
        shutil.copyfile(source, link)
    try:
        files = run_emf2sf(
            find_executable(tools.emf2sf_path), link, out, tools.emf2sf_timeout_s, cancel
        )
    except Emf2sfCancelled:
        raise ConversionCancelled("cancelled") from None
    staged: list[tuple[Path, Dataset]] = []
    for f in files:
        try:
            header = _header(f)
        except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
            raise ConversionError(f"emf2sf wrote an unreadable file {f.name}: {exc}") from None
        if not text_of(header, "SOPInstanceUID"):
            raise ConversionError(f"emf2sf wrote {f.name} without a SOP Instance UID")
        target = series_tmp / file_name(header)
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(f, target)
        staged.append((target, header))
    fsync_dir(series_tmp)
    return source_uid, staged


def place_series(
    staged: Path,
    ae_root: Path,
    plan: tuple[FolderLevel, ...],
    resolver: FolderResolver | None = None,
) -> Path:
    """Move the complete staged series folder into the folder of ``plan`` below ``ae_root``.

    The patient and study folders are the existing ones of the same identity
    (:class:`~dicomnode.storage.FolderResolver`); a new series folder is the
    staged folder renamed in one step. When the series folder already exists
    each file is moved in with ``os.replace`` (same names for the same
    instances, so a re-send replaces its files). Returns the series folder.

    Raises
    ------
    OSError
        When the folder cannot be created or renamed.
    """
    final_dir, moved = (resolver or FolderResolver()).place_folder(staged, ae_root, plan)
    if not moved:
        for f in sorted(staged.iterdir()):
            os.replace(f, final_dir / f.name)
        fsync_dir(final_dir)
    return final_dir


# --------------------------------------------------------------------------- background worker


def _staging_token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _is_live_staging(name: str, own_token: str) -> bool:
    """Return True when staging folder ``name`` belongs to this worker or a live process.

    Each receiver process runs a worker; a folder of a sibling that is still
    running must not be deleted. On Windows (one receiver process) only our own
    folders count as live.
    """
    if name.startswith(own_token):
        return True
    pid_text = name.split("-", 1)[0]
    if os.name == "nt" or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # an earlier worker of this process, finished or stopped
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by another user
    return True


def marker_path(stored_path: Path, ae_root: Path) -> Path:
    """Return the pending-job marker of ``stored_path`` (stable per stored file)."""
    key = _relative_key(stored_path, ae_root)
    digest = hashlib.sha1(key.encode("utf-8"), usedforsecurity=False).hexdigest()
    return ae_root / PENDING_DIR / f"{digest}.json"


def _relative_key(stored_path: Path, ae_root: Path) -> str:
    try:
        return stored_path.relative_to(ae_root).as_posix()
    except ValueError:
        return str(stored_path)


class ConversionWorker:
    """One background thread converting stored Enhanced objects, crash-safely.

    Parameters
    ----------
    tools : ToolsConfig
        ``enhanced_mr_conversion`` (``native``, ``emf2sf`` or ``off``),
        ``keep_enhanced_original``, ``emf2sf_path`` and ``emf2sf_timeout_s``.
    layout : str
        Folder layout template below the AE folder.
    lock_dir : Path, optional
        The folder lock shared with the receiver (its ``destination_dir``), so a
        converted series joins the patient and study folders the receiver files into.
    """

    def __init__(self, tools: ToolsConfig, layout: str, lock_dir: Path | None = None) -> None:
        self.tools = tools
        self.layout = layout
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._queued: set[Path] = set()
        self._thread: threading.Thread | None = None
        self._token = _staging_token()
        self._resolver = FolderResolver(lock_dir)
        self._started_at = time.time()
        self.idle = threading.Event()
        self.idle.set()

    @property
    def enabled(self) -> bool:
        """Return True when conversion is configured (native or emf2sf)."""
        return self.tools.enhanced_mr_conversion in ("native", "emf2sf")

    def start(self) -> None:
        """Start the background thread (once)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="dicomnode-convert", daemon=True)
        self._thread.start()

    def submit(self, stored_path: Path, ae_root: Path, sop_class_uid: str) -> None:
        """Queue the conversion of a durably stored object; never raises.

        A no-op when conversion is off or the SOP class is not convertible (an
        Enhanced class without a classic target gets one INFO line). Otherwise a
        pending-job marker is written atomically before the job is queued.

        Parameters
        ----------
        stored_path : Path
            Where the received object is stored (below ``ae_root``).
        ae_root : Path
            Its AE folder; the converted series is placed below it.
        sop_class_uid : str
            SOP Class UID of the stored object.
        """
        try:
            if not self.enabled:
                return
            if sop_class_uid not in CLASSIC_SOP_CLASS:
                if sop_class_uid in NO_CLASSIC_TARGET:
                    logger.info(
                        "%s sop_class_uid=%s path=%s", _NO_TARGET_LINE, sop_class_uid, stored_path
                    )
                return
            marker: Path | None = None
            try:
                marker = self._write_marker(stored_path, ae_root, sop_class_uid)
            except OSError as exc:
                logger.error(
                    "cannot record pending conversion of %s (%s); converting without a marker",
                    stored_path,
                    exc.strerror or exc,
                )
            self._enqueue(_Job(stored_path, ae_root, marker))
        except Exception:
            logger.exception("CONVERT-FAILED path=%s reason=could not queue", stored_path)

    def resume(self, roots: Iterable[Path]) -> int:
        """Queue the jobs whose markers a previous run left under ``roots``.

        Stale staging folders of earlier runs are deleted (they were never renamed
        into place, so nothing visible is lost).

        Returns
        -------
        int
            The number of jobs queued.
        """
        count = 0
        for root in roots:
            try:
                count += self._resume_root(root)
            except OSError as exc:
                logger.error("cannot resume conversions under %s: %s", root, exc.strerror or exc)
        if count:
            logger.info("RESUMED %d interrupted conversion(s)", count)
        return count

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; a job in progress is abandoned cleanly and resumes later."""
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("conversion did not stop within %.1f s; abandoned", timeout_s)

    def wait_idle(self, timeout_s: float) -> bool:
        """Return True once no job is queued or running (used by tests and tools)."""
        return self.idle.wait(timeout_s)

    # -- internals

    def _write_marker(self, stored_path: Path, ae_root: Path, sop_class_uid: str) -> Path:
        marker = marker_path(stored_path, ae_root)
        record = {
            "path": _relative_key(stored_path, ae_root),
            "sop_class_uid": sop_class_uid,
        }
        with self._lock:
            write_bytes_atomic(json.dumps(record).encode("utf-8"), marker)
        return marker

    def _remove_marker(self, marker: Path | None) -> None:
        if marker is None:
            return
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
            fsync_dir(marker.parent)

    def _enqueue(self, job: _Job) -> bool:
        with self._lock:
            key = job.marker or job.stored_path
            if key in self._queued:
                return False
            self._queued.add(key)
            self.idle.clear()
        self._queue.put(job)
        return True

    def _resume_root(self, root: Path) -> int:
        staging = root / STAGING_DIR
        if staging.is_dir():
            for entry in staging.iterdir():
                if not _is_live_staging(entry.name, self._token):
                    shutil.rmtree(entry, ignore_errors=True)
        pending = root / PENDING_DIR
        if not pending.is_dir():
            return 0
        count = 0
        for marker in sorted(pending.iterdir()):
            try:
                if marker.stat().st_mtime > self._started_at:
                    continue  # written by a live sibling receiver process, not a crash
            except OSError:
                continue
            if marker.suffix != ".json":
                if marker.name.endswith(".part"):
                    with contextlib.suppress(OSError):
                        marker.unlink()
                continue
            try:
                record = json.loads(marker.read_text(encoding="utf-8"))
                stored = Path(record["path"])
            except (ValueError, KeyError, TypeError, OSError):
                logger.warning("CONVERT-FAILED marker=%s reason=unreadable marker", marker)
                self._remove_marker(marker)
                continue
            stored = stored if stored.is_absolute() else root / stored
            if not stored.is_file():
                logger.warning(
                    "CONVERT-FAILED path=%s reason=stored object no longer exists", stored
                )
                self._remove_marker(marker)
                continue
            if self._enqueue(_Job(stored, root, marker)):
                count += 1
        return count

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.2)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty() and not self._queued:
                        self.idle.set()
                continue
            if job is None or self._stop.is_set():
                break
            with self._lock:
                self._queued.discard(job.marker or job.stored_path)
            try:
                self._process(job)
            except Exception:  # thread boundary: log and keep the worker alive
                logger.exception("CONVERT-FAILED path=%s reason=unexpected error", job.stored_path)
            with self._lock:
                if self._queue.empty() and not self._queued:
                    self.idle.set()

    def _process(self, job: _Job) -> None:
        if not job.stored_path.is_file():
            logger.warning(
                "CONVERT-FAILED path=%s reason=stored object no longer exists", job.stored_path
            )
            self._remove_marker(job.marker)
            return
        try:
            convert_file(
                job.stored_path,
                job.ae_root,
                self.tools,
                self.layout,
                cancel=self._stop.is_set,
                staging_token=self._token,
                resolver=self._resolver,
            )
        except ConversionCancelled:
            logger.info("CONVERT-INTERRUPTED path=%s (resumes after restart)", job.stored_path)
            return
        except ConversionError as exc:
            logger.error("CONVERT-FAILED path=%s reason=%s (original kept)", job.stored_path, exc)
            self._remove_marker(job.marker)
            return
        except OSError as exc:
            logger.error(
                "CONVERT-FAILED path=%s reason=%s (original kept; retried after restart)",
                job.stored_path,
                exc.strerror or exc,
            )
            return
        except Exception as exc:
            logger.exception(
                "CONVERT-FAILED path=%s reason=unexpected error %r (original kept)",
                job.stored_path,
                exc,
            )
            self._remove_marker(job.marker)
            return
        self._remove_marker(job.marker)
        if not self.tools.keep_enhanced_original:
            _delete_original(job.stored_path, job.ae_root)


def _delete_original(path: Path, ae_root: Path) -> None:
    """Delete the enhanced original (its classic series is in place) and empty folders."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        logger.error("cannot delete enhanced original %s: %s", path, exc.strerror or exc)
        return
    fsync_dir(path.parent)
    folder = path.parent
    while folder != ae_root and ae_root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            break
        folder = folder.parent
    logger.info("DELETED enhanced original %s (keep_enhanced_original = false)", path)


# --------------------------------------------------------------------------- offline command


def _expand(inputs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    files: list[Path] = []
    missing: list[Path] = []
    for item in inputs:
        if item.is_file():
            files.append(item)
        elif item.is_dir():
            files.extend(
                sorted(
                    p
                    for p in item.rglob("*")
                    if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(item).parts)
                )
            )
        else:
            missing.append(item)
    return files, missing


def convert_paths(inputs: Sequence[Path], out_dir: Path, tools: ToolsConfig, layout: str) -> int:
    """Convert Enhanced files and folders (recursively) into ``out_dir`` (``dicomnode convert``).

    The output tree is ``out_dir / <layout folders> / <files>``, written like the
    receiver's. Inputs are never modified. With ``enhanced_mr_conversion = emf2sf``
    the emf2sf backend is used, otherwise the native converter.

    Parameters
    ----------
    inputs : sequence of Path
        Files or folders.
    out_dir : Path
        Root of the converted tree.
    tools : ToolsConfig
        Backend selection and emf2sf settings.
    layout : str
        Folder layout template.

    Returns
    -------
    int
        0 when every convertible input was converted, 1 when any failed or an
        input does not exist.
    """
    if tools.enhanced_mr_conversion != "emf2sf":
        tools = replace(tools, enhanced_mr_conversion="native")
    files, missing = _expand(inputs)
    failures = len(missing)
    for item in missing:
        logger.error("CONVERT-FAILED path=%s reason=no such file or folder", item)
    token = uuid.uuid4().hex[:12]
    resolver = FolderResolver()
    for path in files:
        try:
            sop_class = text_of(_header(path), "SOPClassUID")
        except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, OSError):
            logger.info("SKIPPED path=%s reason=not a DICOM file", path)
            continue
        if sop_class not in CLASSIC_SOP_CLASS:
            reason = (
                _NO_TARGET_LINE
                if sop_class in NO_CLASSIC_TARGET
                else "not an Enhanced multi-frame image"
            )
            logger.info("SKIPPED path=%s reason=%s", path, reason)
            continue
        try:
            convert_file(path, out_dir, tools, layout, staging_token=token, resolver=resolver)
        except (ConversionError, OSError) as exc:
            failures += 1
            logger.error("CONVERT-FAILED path=%s reason=%s", path, exc)
    with contextlib.suppress(OSError):
        (out_dir / STAGING_DIR).rmdir()  # offline: nobody else uses it
    return 0 if failures == 0 else 1

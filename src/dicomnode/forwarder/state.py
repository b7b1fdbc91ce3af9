"""On-disk retry state of the forwarder, kept in a hidden folder of the watch folder.

Each group that failed for network reasons has one small JSON file in
``<watch_folder>/.dicomnode-state/`` holding its first-failure time, attempt
count, next attempt time (all wall-clock epoch seconds) and last error. Files
are replaced atomically, so a kill at any moment leaves either the old or the
new state. The folder is hidden, so the watcher ignores it. Imports the standard
library and :mod:`dicomnode.storage`; never pynetdicom or watchdog.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from dicomnode.storage import write_bytes_atomic

logger = logging.getLogger(__name__)

#: Hidden folder below the watch folder that holds the retry state.
STATE_DIR_NAME: Final = ".dicomnode-state"


@dataclass(frozen=True, slots=True)
class RetryState:
    """Network-failure history of one group.

    Attributes
    ----------
    group : str
        Group key (top-level folder name, empty for loose files).
    first_failure : float
        Wall-clock time (epoch s) of the first failure since the last success.
    attempts : int
        Failed attempts since then.
    next_attempt : float
        Wall-clock time (epoch s) before which the group is not tried again.
    last_error : str
        Reason of the latest failure.
    refusals : dict of str to int
        Per file of the group (as logs name it): how often the target refused it
        temporarily while accepting other objects.
    """

    group: str
    first_failure: float
    attempts: int
    next_attempt: float
    last_error: str = ""
    refusals: dict[str, int] = field(default_factory=dict)


class StateStore:
    """Read and write :class:`RetryState` files below ``<watch_folder>/.dicomnode-state``.

    Parameters
    ----------
    watch_folder : Path
        The forwarder's watch folder.
    destination : str
        A destination's name: its states live in a folder of their own. Empty
        for ``default``, whose states stay where the single target kept them.
    """

    def __init__(self, watch_folder: Path, destination: str = "") -> None:
        self.folder = watch_folder / STATE_DIR_NAME
        if destination:
            # one folder per named destination; ``default`` keeps the single target's place
            digest = hashlib.sha1(destination.encode("utf-8", "surrogateescape")).hexdigest()[:12]
            self.folder = self.folder / f"destination-{digest}"

    def _path(self, group: str) -> Path:
        digest = hashlib.sha1(group.encode("utf-8", "surrogateescape")).hexdigest()[:20]
        return self.folder / f"retry-{digest}.json"

    def load(self, group: str) -> RetryState | None:
        """Return the stored state of ``group``, or None (also when the file is damaged)."""
        path = self._path(group)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            state = RetryState(
                group=str(raw["group"]),
                first_failure=float(raw["first_failure"]),
                attempts=int(raw["attempts"]),
                next_attempt=float(raw["next_attempt"]),
                last_error=str(raw.get("last_error", "")),
                refusals={str(k): int(v) for k, v in dict(raw.get("refusals", {})).items()},
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("STATE-DAMAGED %s: %s (starting afresh)", path, exc)
            return None
        return state if state.group == group else None

    def save(self, state: RetryState) -> None:
        """Store ``state`` atomically; a failure to write is logged, not raised."""
        data = json.dumps(asdict(state), ensure_ascii=False).encode("utf-8")
        try:
            write_bytes_atomic(data, self._path(state.group))
        except OSError as exc:
            logger.error("STATE-WRITE-FAILED group=%s: %s", state.group, exc)

    def clear(self, group: str) -> None:
        """Forget the state of ``group`` (after a success, or when the group is gone)."""
        with contextlib.suppress(OSError):
            self._path(group).unlink()

    def load_all(self) -> dict[str, RetryState]:
        """Return every stored state by group key."""
        found: dict[str, RetryState] = {}
        if not self.folder.is_dir():
            return found
        for path in self.folder.glob("retry-*.json"):
            try:
                group = str(json.loads(path.read_text(encoding="utf-8"))["group"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            state = self.load(group)
            if state is not None:
                found[group] = state
        return found

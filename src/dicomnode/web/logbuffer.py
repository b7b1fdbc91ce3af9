"""Keep the node's most recent log lines in memory for the console's Log page."""

from __future__ import annotations

import collections
import logging
import threading


class RecentLines(logging.Handler):
    """A logging handler that keeps the last ``capacity`` formatted lines with their verb."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
        self._lines: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        """Keep ``record`` (level, verb = first word of the message, formatted line)."""
        try:
            line = self.format(record)
            message = record.getMessage()
            verb = message.split(" ", 1)[0] if message else ""
            if not verb.replace("-", "").isupper():
                verb = ""
            with self._guard:
                self._lines.append((record.levelname, verb, line))
        except Exception:
            self.handleError(record)

    def lines(self, verb: str = "", limit: int = 500) -> list[tuple[str, str, str]]:
        """Return the newest lines first, only those with ``verb`` when given."""
        with self._guard:
            items = list(self._lines)
        items.reverse()
        if verb:
            items = [i for i in items if i[1] == verb]
        return items[:limit]

    def verbs(self) -> list[str]:
        """Return the verbs seen, sorted."""
        with self._guard:
            return sorted({v for _, v, _ in self._lines if v})

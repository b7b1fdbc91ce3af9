"""Configure logging from [Logging] and the CLI's verbosity: console plus optional rotating file.

Only this module attaches handlers; the package itself adds a NullHandler.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys

from dicomnode.config import LoggingConfig
from dicomnode.logsafe import escape_message

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """Format records with any control character of the message escaped.

    Call sites escape peer-supplied values with :func:`dicomnode.logsafe.escape`;
    this catches the rest (an exception text quoting peer data, a library's
    message), so a record is always one line. Tracebacks stay multi-line.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        """Return the formatted line, the message part escaped."""
        record.message = escape_message(record.message)
        return super().formatMessage(record)


def configure(cfg: LoggingConfig, verbose: bool = False) -> None:
    """Attach console (stderr) and optional rotating-file handlers.

    Parameters
    ----------
    cfg : LoggingConfig
        ``verbose`` selects DEBUG for dicomnode; ``log_file`` adds a rotating file;
        ``pynetdicom_level`` sets the pynetdicom logger on its own.
    verbose : bool
        The CLI's ``-v``; DEBUG like ``verbose = true``.
    """
    level = logging.DEBUG if (cfg.verbose or verbose) else logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = OneLineFormatter(_FORMAT)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    root.addHandler(console)
    if cfg.log_file is not None:
        cfg.log_file.parent.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            cfg.log_file,
            maxBytes=cfg.log_max_mb * 1024 * 1024,
            backupCount=cfg.log_backup_count,
            encoding="utf-8",
        )
        rotating.setFormatter(formatter)
        root.addHandler(rotating)
    root.setLevel(logging.WARNING)
    logging.getLogger("dicomnode").setLevel(level)
    logging.getLogger("pynetdicom").setLevel(
        getattr(logging, cfg.pynetdicom_level, logging.WARNING)
    )
    logging.getLogger("watchdog").setLevel(logging.WARNING)

"""dicomnode: a trusted DICOM receiver and ordered folder forwarder.

This package module only exposes the version and attaches a NullHandler to the
``dicomnode`` logger; handlers are attached by :mod:`dicomnode.logsetup`.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger("dicomnode").addHandler(logging.NullHandler())

"""Enhanced multi-frame to classic single-frame conversion.

:mod:`~dicomnode.convert.native` is the pure in-memory converter,
:mod:`~dicomnode.convert.emf2sf` runs dcm4che's ``emf2sf`` as an optional backend,
and :mod:`~dicomnode.convert.worker` does the file-system work (crash-safe series
placement, pending-job markers, the background thread and the offline command).
"""

from __future__ import annotations

from dicomnode.convert.native import (
    CLASSIC_SOP_CLASS,
    NO_CLASSIC_TARGET,
    convert_dataset,
    name_based_uid,
)

__all__ = ["CLASSIC_SOP_CLASS", "NO_CLASSIC_TARGET", "convert_dataset", "name_based_uid"]

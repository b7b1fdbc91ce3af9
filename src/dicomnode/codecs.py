"""Which pixel codecs a process loads: keep them out of processes that never decode pixels.

pydicom imports numpy, GDCM and pylibjpeg at start-up whenever they are installed
(about 35 MB of memory). Only the forwarder's transcoding decodes pixels; a receiver
process files objects as received and the native Enhanced conversion copies pixel
bytes without decoding them. Imports only the standard library.
"""

from __future__ import annotations

import sys
from typing import Final

#: Modules pydicom imports when installed that only pixel decoding uses.
PIXEL_CODEC_MODULES: Final = ("numpy", "gdcm", "pylibjpeg")


def keep_codecs_out() -> bool:
    """Make later imports of the pixel codecs fail in this process, so pydicom skips them.

    Must run before pydicom is imported; afterwards it changes nothing.

    Returns
    -------
    bool
        True when the codecs are kept out, False when pydicom (or a codec) was already loaded.
    """
    if "pydicom" in sys.modules or any(sys.modules.get(n) for n in PIXEL_CODEC_MODULES):
        return False
    for name in PIXEL_CODEC_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]
    return True

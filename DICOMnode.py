"""Compatibility shim: ``python DICOMnode.py [options]`` as in the original tool.

Works from a source checkout without installing (adds ``src/`` to the path when
the package is not importable) and from an installed environment.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from dicomnode.cli import main
except ImportError:  # running from a checkout without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from dicomnode.cli import main

if __name__ == "__main__":
    sys.exit(main())

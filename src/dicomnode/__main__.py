"""Entry point for ``python -m dicomnode``."""

from __future__ import annotations

import sys

from dicomnode.cli import main

if __name__ == "__main__":
    sys.exit(main())

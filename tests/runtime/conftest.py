"""Runtime tests: make the shared helpers (runtime_models) importable here and in the ranks."""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

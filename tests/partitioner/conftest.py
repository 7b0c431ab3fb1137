"""Partitioner tests: the shared helpers of this folder (``example_graphs``,
``random_problems``) importable by name from its subfolders."""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

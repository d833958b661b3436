"""Put the repository root first on sys.path, under a bare ``pytest`` too.

First, not just present: Ray's dependencies bring the proto-plus package, which installs a
top-level ``proto`` package into site-packages that would shadow this repository's.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [_ROOT]:
    sys.path.insert(0, _ROOT)

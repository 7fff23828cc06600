"""``bench/`` is the repository's own folder, not an installed package: the
tests here import it from the clone.  Appended to the path, not put first,
so that ``axnet`` is still the installed package (with its C extension)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.append(REPO)

"""tests/gpu reuses tests/dist's rank functions and reference checks: that folder goes on ``sys.path`` here,
as pytest itself puts it there when it collects it (rootdir-based imports: ``import test_optimizer``).
The ranks that ``run_ranks`` starts inherit this ``sys.path``, so they find the same modules."""

import sys
from pathlib import Path

_DIST = str(Path(__file__).resolve().parent.parent / "dist")
if _DIST not in sys.path:
    sys.path.insert(0, _DIST)

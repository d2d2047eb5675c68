"""Make the repo's top-level packages (planner, search, passes, runtime) importable in tests and in
the ranks `tests/distributed.py` spawns (spawn hands the parent's sys.path to each child)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

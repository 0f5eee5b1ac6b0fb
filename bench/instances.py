#!/usr/bin/env python3
"""Instances 1 → 2 → 3 on one MariaDB and one Redis (`just bench-instances`).

The benchmark itself is bench/scenarios/instances.py (`--help` there says what it does); this
file keeps its command, `python3 bench/instances.py`, as docs/scaling.md gives it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenarios.instances import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

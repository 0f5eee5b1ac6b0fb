#!/usr/bin/env python3
"""One Galera node alone against the 3-node cluster, one instance per node (`just bench-galera`).

The benchmark itself is bench/scenarios/galera.py (`--help` there says what it does); this
file keeps its command, `python3 bench/galera.py`, as docs/scaling.md gives it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenarios.galera import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

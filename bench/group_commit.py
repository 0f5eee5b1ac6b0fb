#!/usr/bin/env python3
"""Group commit off, per user and across users, side by side (`just bench-group-commit`).

The benchmark itself is bench/scenarios/group_commit.py (`--help` there says what it does).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenarios.group_commit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The lock on one Redis against the lock on a Redis Cluster (`just bench-redis-cluster`).

The benchmark itself is bench/scenarios/redis_cluster.py (`--help` there says what it does); this
file keeps its command, `python3 bench/redis_cluster.py`, as docs/scaling.md gives it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scenarios.redis_cluster import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

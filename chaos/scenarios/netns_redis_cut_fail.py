"""As netns-redis-cut, with LOCK_ON_REDIS_DOWN=fail."""

from __future__ import annotations

from lib.driver import Spec
from scenarios.netns_redis_cut import evidence_netns, fault_netns_cut


SPEC = Spec("netns-redis-cut-fail",
            "as netns-redis-cut, with LOCK_ON_REDIS_DOWN=fail",
            "N refused changes with 503 while cut (clients went on through A and B); A and B unaffected",
            fault_netns_cut, evidence_netns, host_instances=2, netns=True, mode="fail")

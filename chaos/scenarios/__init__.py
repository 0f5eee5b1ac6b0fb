"""The scenarios of the fault suite, one module each, in the order they run.

Each module defines `SPEC` (a `lib.driver.Spec`: what is injected, what is checked, the
fault coroutine and the evidence that it happened). Add a scenario by adding a module and
its name here.
"""

from __future__ import annotations

import importlib

from lib.driver import Spec

MODULES = [
    "kill9_instance",
    "mariadb_kill",
    "redis_kill_degrade",
    "redis_kill_fail",
    "redis_pause_lease",
    "db_stall_ftwrl",
    "db_stall_sigstop",
    "duplicate_storm",
    "netns_redis_cut",
    "netns_redis_cut_fail",
    "redis_cluster_kill_degrade",
    "redis_cluster_kill_fail",
    "galera_kill9_node",
    "galera_sigstop_node",
    "coupon_rush_kill9_instance",
    "coupon_rush_redis_kill",
    "group_commit_kill9",
]


def all_specs() -> list[Spec]:
    return [importlib.import_module(f"scenarios.{m}").SPEC for m in MODULES]

"""Section 9: what the compartment's cgroup adds to one delivery, side by side with rlimits.

The same `filter` delivery through /bin/cat, with limits.enforcement = "cgroup" and "rlimits".
Two spacings, because on cgroup v1 the child's move into its cgroup takes a lock whose writer
waits for an RCU grace period when no cgroup move happened in the last few milliseconds:
deliveries one after another (a busy supervisor), and each cgroup delivery after one without
(as sporadic mail arrives).  cgroup v2 moves nothing: the clone puts the child in its cgroup.
"""

from __future__ import annotations

import os
import statistics
from typing import TYPE_CHECKING

import measure
from measure import Target
from sections_api import Descriptors

if TYPE_CHECKING:
    from bench import Context

TARGET_MS = 0.3
IN_A_ROW = 10


def cgroup_cost(ctx: Context) -> list[Target]:
    rounds = ctx.sizes.cgroup_rounds
    measure.heading(f"9. cgroup cost per delivery: limits.enforcement cgroup vs rlimits "
                   f"({rounds} rounds interleaved, then {rounds // IN_A_ROW} rounds of "
                   f"{IN_A_ROW} in a row)")
    targets = [Target("cgroup cost per delivery, in a row", None, TARGET_MS, False, " ms"),
               Target("cgroup cost per delivery, after one without", None, TARGET_MS, False,
                      " ms")]
    why = _unusable(ctx)
    if why:
        print(f"  SKIP: {why}")
        return targets
    from compartment import cgroups

    print(f"  cgroups: {'; '.join(f'v{h.version} {h.base}' for h in cgroups.layout())}")
    core, fds = ctx.core, Descriptors(ctx)
    policies = {mode: core.Policy.load("filter", {"limits.enforcement": mode})
                for mode in ("cgroup", "rlimits")}

    def deliveries(mode: str, count: int) -> None:
        for _ in range(count):
            fds.rewind()
            core.deliver(policies[mode], fds.message, fds.out, fds.err)

    check = lambda name, _value: fds.check(name, ctx.expected_message)  # noqa: E731
    apart = measure.interleave({mode: lambda m=mode: deliveries(m, 1) for mode in policies},
                               rounds, 10, fds.rewind, check)
    measure.table(apart, "rlimits")
    together = measure.interleave(
        {f"{mode}, {IN_A_ROW} in a row": lambda m=mode: deliveries(m, IN_A_ROW)
         for mode in policies}, rounds // IN_A_ROW, 2, fds.rewind, check)
    measure.table(together, f"rlimits, {IN_A_ROW} in a row")
    fds.close()
    targets[0].measured = (statistics.median(together[f"cgroup, {IN_A_ROW} in a row"].wall_ms)
                           - statistics.median(together[f"rlimits, {IN_A_ROW} in a row"].wall_ms)
                           ) / IN_A_ROW
    targets[1].measured = apart["cgroup"].median - apart["rlimits"].median
    return targets


def _unusable(ctx: Context) -> str:
    if ctx.core is None:
        return "compartment is not importable"
    if os.geteuid() != 0:
        return "only root makes cgroups"
    from compartment import cgroups

    try:
        cgroups.layout()
    except cgroups.Unavailable as err:
        return f"no usable cgroup: {err}"
    return ""

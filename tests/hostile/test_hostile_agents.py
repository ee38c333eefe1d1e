"""Every hostile agent of the table, under real confinement: nothing found outside, and the
exit class an MTA would act on is the right one."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_cases import CASES
from hostile_run import Case, run_case

# Escapes that compartment knows of and does not prevent yet; each is in the README's limits.
# strict: the day one is fixed, its test says so.
KNOWN = {
    "fill-mail-many-files": "known limit: limits.file_bytes bounds each file the agent writes "
                            "in its writable directory, not their total; the mailbox owner's "
                            "filesystem quota is what bounds that",
}
# The same for the unprivileged mode alone: without a cgroup (an unprivileged caller cannot
# make one) the limits are rlimits, per process or per uid; README, "Limits of this version".
_RLIMITS_ONLY = "known limit of the unprivileged (rlimits) mode: "
KNOWN_UNPRIVILEGED = {
    "socket-buffer-bomb@nobody": _RLIMITS_ONLY + "kernel memory such as socket buffers is "
                                 "counted by no rlimit",
    "cpu-serial-children@nobody": _RLIMITS_ONLY + "RLIMIT_CPU bounds each process, and fresh "
                                  "processes each get their own",
}


def _marks(case: Case) -> list[pytest.MarkDecorator]:
    reason = KNOWN_UNPRIVILEGED.get(case.name) or KNOWN.get(case.name.removesuffix("@nobody"))
    return [pytest.mark.xfail(reason=reason, strict=True)] if reason else []


@pytest.mark.parametrize("case", [pytest.param(c, marks=_marks(c)) for c in CASES],
                         ids=[f"{c.group}-{c.name}" for c in CASES])
def test_agent_is_contained(case: Case, case_dir: Path, hostile_bin: Path,
                            unprivileged_reason: str | None) -> None:
    if case.user != "root" and unprivileged_reason:
        pytest.skip(unprivileged_reason)
    verdict = run_case(case, case_dir, hostile_bin)
    assert not verdict.error, verdict.error
    assert verdict.contained, verdict.line()
    assert not verdict.wrong, verdict.line()

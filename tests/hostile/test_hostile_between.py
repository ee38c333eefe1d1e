"""Two compartments at once must not reach each other (or the host) through /dev/shm, SysV
IPC, abstract sockets, flock on a shared file, keyrings or signals."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_between import PAIRS, Pair, run_pair

# Escapes that compartment knows of and does not prevent yet; each is in the README's limits.
# strict: the day one is fixed, its test says so.
KNOWN = {
    "flock-shared-file": "known limit: a file the policy shows read-only to several "
                         "compartments (filesystem.readable, /usr) is the same inode for all, "
                         "so an advisory flock on it is seen by each of them and by the host",
}


def _marks(name: str) -> list[pytest.MarkDecorator]:
    reason = KNOWN.get(name.removesuffix("@nobody"))
    return [pytest.mark.xfail(reason=reason, strict=True)] if reason else []


@pytest.mark.parametrize("pair", [pytest.param(p, marks=_marks(p.name)) for p in PAIRS],
                         ids=[p.name for p in PAIRS])
def test_compartments_do_not_reach_each_other(pair: Pair, case_dir: Path, hostile_bin: Path,
                                              unprivileged_reason: str | None) -> None:
    if pair.user != "root" and unprivileged_reason:
        pytest.skip(unprivileged_reason)
    verdict = run_pair(pair, case_dir, hostile_bin)
    assert not verdict.error, verdict.error
    assert verdict.contained, verdict.line()
    assert not verdict.wrong, verdict.line()

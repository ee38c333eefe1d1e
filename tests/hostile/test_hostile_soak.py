"""A short soak in the default test run (`make soak` runs the long one): 200 deliveries in a
row, then 4 concurrent callers of 50 each; nothing may be left behind."""

from __future__ import annotations

import os

import pytest
from hostile_soak import soak, soak_served

DELIVERIES = int(os.environ.get("HOSTILE_SOAK_DELIVERIES", "200"))


def test_short_soak_leaves_nothing(hostile_root: object) -> None:
    if os.geteuid() != 0:
        pytest.skip("the soak leases pool uids, which needs root")
    problems, _, _ = soak(DELIVERIES, callers=4)
    assert not problems, "\n".join(problems)


def test_short_soak_through_the_daemon_leaves_nothing(hostile_root: object) -> None:
    """The same through `compartment serve`: nothing left in the callers nor in the daemon."""
    if os.geteuid() != 0:
        pytest.skip("the daemon runs as root")
    problems, _, _ = soak_served(DELIVERIES, callers=4)
    assert not problems, "\n".join(problems)

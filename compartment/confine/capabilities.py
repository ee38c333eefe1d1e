"""Capabilities: none left, the bounding set emptied, securebits locked.

Child side, in two calls because of one ordering constraint: emptying the bounding set and
locking securebits need CAP_SETPCAP, which the uid change takes away, so `restrict` runs before
credentials; `drop_all` runs after them and verifies that nothing is left (as root the uid
change already cleared the sets; in a user namespace the ids do not change, so we clear them).
"""

from __future__ import annotations

import prctl

from compartment import syscalls
from compartment.confine.errors import SetupError, fail

STEP = "capabilities"

# SECBIT_NOROOT: uid 0 gains no capabilities by exec; KEEP_CAPS and NO_CAP_AMBIENT_RAISE pinned;
# every bit locked so that nothing below can undo it.
_SECUREBITS = (prctl.SECBIT_NOROOT | prctl.SECBIT_NOROOT_LOCKED
               | prctl.SECBIT_NO_SETUID_FIXUP_LOCKED | prctl.SECBIT_KEEP_CAPS_LOCKED
               | (1 << 6) | (1 << 7))  # SECBIT_NO_CAP_AMBIENT_RAISE and its lock


def restrict(last_cap: int) -> None:
    """Privileged: empty the bounding set and lock securebits."""
    try:
        for cap in range(last_cap + 1):
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap, "prctl(PR_CAPBSET_DROP)")
        # python-prctl knows no NO_CAP_AMBIENT_RAISE bits, so the raw call sets them all.
        syscalls.prctl(syscalls.PR_SET_SECUREBITS, _SECUREBITS, "prctl(PR_SET_SECUREBITS)")
    except OSError as err:
        raise fail(STEP, "prctl", err) from None
    if syscalls.prctl(syscalls.PR_GET_SECUREBITS) != _SECUREBITS:
        raise SetupError(STEP, "get_securebits", 0, "securebits not as set")


def drop_all(last_cap: int) -> None:
    """After the uid change: clear every set and check each is empty."""
    try:
        syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL,
                       "prctl(PR_CAP_AMBIENT)")
        syscalls.capset_empty()
    except OSError as err:
        raise fail(STEP, "capset", err) from None
    left = {name: hex(mask) for name, mask in syscalls.capget().items() if mask}
    if left:
        raise SetupError(STEP, "capget", 0, f"capabilities still held: {left}")
    bounding = [cap for cap in range(last_cap + 1) if prctl.capbset_read(cap)]
    if bounding:
        raise SetupError(STEP, "capbset_read", 0, f"bounding set still holds {bounding}")

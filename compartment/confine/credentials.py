"""Credentials: supplementary groups, gid, uid — in that order — then read back and checked.

Child side.  As root: become the compartment's uid and gid (a pool lease, the mailbox owner or
a fixed id); groups must go first and the uid last, because each step needs the privilege the
next one removes (qmail's prot.c).  In a user namespace the caller's own ids were mapped and
setgroups is denied, so the ids are only verified.
"""

from __future__ import annotations

import os

from compartment.confine.errors import SetupError, fail

STEP = "credentials"


def enter(uid: int, gid: int, change: bool) -> None:
    if change:
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        except OSError as err:
            raise fail(STEP, "setresuid", err, f"uid {uid} gid {gid}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise SetupError(STEP, "getresuid", 0, f"ids are {os.getresuid()}/{os.getresgid()}, "
                                               f"wanted {uid}/{gid}")
    if change and os.getgroups():
        raise SetupError(STEP, "getgroups", 0, f"groups left: {os.getgroups()}")

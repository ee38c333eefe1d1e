"""What a peer may ask of the resident supervisor: its rule, its policy, its overrides.

Privileged (the daemon, root).  The peer is who SO_PEERCRED says.  It names a policy — the
administrator's /etc/compartment/policies/NAME.toml, else the shipped one — and never sends one;
its rule in the server configuration lists the names it may use and the --set keys it may give;
each key is bounded as serveconfig.SETTABLE says (limits only lowered, booleans only tightened).
A refusal is an exception whose message goes to the client and to the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence

from compartment import syscalls
from compartment.policy import Policy, PolicyError
from compartment.serveconfig import SETTABLE, Rule


class Refused(Exception):
    """The request is refused; the message says why (to the client and in the log)."""


@dataclasses.dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...]  # gid and supplementary groups, from SO_PEERGROUPS

    def __str__(self) -> str:
        return f"uid {self.uid} (pid {self.pid})"


def policy_for(peer: Peer, rule: Rule, name: str, sets: Sequence[str]) -> Policy:
    """The policy the request names, with its overrides, if the rule allows them.  The name is
    a name (protocol.py): a peer never has a file of its own read as a policy."""
    if "*" not in rule.policies and name not in rule.policies:
        raise Refused(f"policy {name} is not allowed for {peer} ({rule.where})")
    keys = [item.partition("=")[0] for item in sets]
    for key in keys:
        if not rule.allows_set(key):
            raise Refused(f"--set {key} is not allowed for {peer} ({rule.where})")
    try:
        policy = _load(name, tuple(sets))
        if "*" in rule.set:
            return policy
        # The bounds are the policy's own values; with the request's paths, without which a
        # policy that runs as the mailbox's owner is not complete.
        paths = tuple(item for item, key in zip(sets, keys, strict=True)
                      if SETTABLE.get(key) == "paths")
        base = _load(name, paths)
    except PolicyError as err:
        raise Refused(f"policy: {err}") from None
    for key in keys:
        _check_bound(key, base, policy)
    return policy


@contextlib.contextmanager
def as_peer(peer: Peer) -> Iterator[None]:
    """Inside, every lookup, open and permission check of the daemon is the peer's own: its
    groups, fsgid and fsuid (which also take the filesystem capabilities away).  The daemon is
    single-threaded, so nothing else of its runs meanwhile; the ids are read back both ways,
    and a daemon that cannot get its own back stops rather than go on as someone else."""
    saved = os.getgroups()
    os.setgroups(peer.groups)
    syscalls.setfsgid(peer.gid)
    syscalls.setfsuid(peer.uid)
    try:
        if (syscalls.setfsuid(-1), syscalls.setfsgid(-1)) != (peer.uid, peer.gid):
            raise Refused(f"cannot take the identity of {peer}")
        yield
    finally:
        syscalls.setfsuid(0)
        syscalls.setfsgid(0)
        os.setgroups(saved)
        if (syscalls.setfsuid(-1), syscalls.setfsgid(-1)) != (0, 0):
            os.abort()  # never go on with a peer's identity


def forget_policies() -> None:
    """After a reload (SIGHUP): policies are read again on their next use."""
    _load.cache_clear()


@functools.lru_cache(maxsize=256)
def _load(name: str, sets: tuple[str, ...]) -> Policy:
    """By name only: the administrator's /etc/compartment/policies/NAME.toml, else the shipped
    one (Policy.load, which refuses a file others could rewrite)."""
    return Policy.load(name, sets)


def _check_bound(key: str, base: Policy, policy: Policy) -> None:
    kind = SETTABLE.get(key, "free")  # environment.set.NAME: the caller's own business
    if kind == "paths":
        # Until each path is opened with the peer's credentials (compartment.paths), none.
        raise Refused(f"--set {key}: paths are not yet accepted from a peer other than root")
    if kind not in ("lower", "tighten"):
        return
    section, field = key.split(".")
    was = getattr(getattr(base, section), field)
    now = getattr(getattr(policy, section), field)
    if kind == "lower" and now > was:
        raise Refused(f"--set {key}: {now} is above the policy's {was}")
    if kind == "tighten" and was and not now:
        raise Refused(f"--set {key}: the policy's {was} may only be tightened")

"""What a peer may ask of the resident supervisor: its rule, its policy, its overrides, its
paths.

Privileged (the daemon, root).  The peer is who SO_PEERCRED says.  It names a policy — the
administrator's /etc/compartment/policies/NAME.toml, else the shipped one — and never sends one;
its rule in the server configuration lists the names it may use and the --set keys it may give;
each key is bounded as serveconfig.SETTABLE says (limits only lowered, booleans only tightened).

Every path it names — the program, a readable or writable path — is opened with its own
credentials (as_peer), following no link but root's and its own, and checked for the access
the run needs (execute, read, write and search); a writable directory must also be its own,
since a policy may run the agent as the directory's owner.  Beyond that only a grant of its rule
(deliver_as_owner: a mail account delivering into /home/*/Maildir as each owner, as local(8)
does).  The descriptor opened is what the compartment is given: nothing is looked up again.
A refusal is an exception whose message goes to the client and to the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import os
import stat
from collections.abc import Iterator, Sequence

from compartment import paths, supervisor, syscalls
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


def opener(peer: Peer, rule: Rule, sets: Sequence[str]) -> supervisor.Opener | None:
    """How the run's paths are opened for this peer (supervisor.prepare's opener); None for
    root, for whom they are opened as `compartment run` opens them."""
    if peer.uid == 0:
        return None
    requested = {item.partition("=")[0] for item in sets}

    def open_paths(name: str, search: str, policy: Policy) -> tuple[str, dict[str, int]]:
        opened: dict[str, int] = {}
        try:
            with as_peer(peer):
                program, fd = supervisor.resolve(name, search, (0, peer.uid))
                opened[program] = fd
                _require(fd, os.X_OK, f"program {program}", peer)
            for kind in ("readable", "writable"):
                for path in getattr(policy.filesystem, kind):
                    named = f"filesystem.{kind}" in requested  # else the policy's own
                    fd = _peer_path(peer, rule, policy, kind, path) if named else \
                        _policy_path(kind, path)
                    if path in opened:
                        os.close(opened[path])
                    opened[path] = fd
        except BaseException:
            supervisor.close_all(opened)
            raise
        return program, opened
    return open_paths


def _peer_path(peer: Peer, rule: Rule, policy: Policy, kind: str, path: str) -> int:
    """A path the peer named: as the peer could open it, or as its rule grants."""
    if kind == "writable" and granted(rule, path):
        if policy.identity.uid != "owner":
            raise Refused(f"filesystem.writable {path}: {rule.where} grants it for delivery as "
                          f"its owner, which policy {policy.name} does not do (identity.uid)")
        fd = _policy_path(kind, path)  # as root, through root's links only
        if os.fstat(fd).st_uid == 0:
            os.close(fd)
            raise Refused(f"filesystem.writable {path}: owned by root")
        return fd
    with as_peer(peer):
        try:
            fd = paths.open_path(path, trusted=(0, peer.uid))
        except paths.PathError as err:
            raise Refused(f"filesystem.{kind} {err} (opened as {peer})") from None
        info = os.fstat(fd)
        directory = stat.S_ISDIR(info.st_mode)
        need = os.W_OK | os.X_OK if kind == "writable" else \
            os.R_OK | (os.X_OK if directory else 0)
        try:
            _require(fd, need, f"filesystem.{kind} {path}", peer)
        except Refused:
            os.close(fd)
            raise
    if kind == "writable" and info.st_uid != peer.uid:
        os.close(fd)
        raise Refused(f"filesystem.writable {path}: not a directory of {peer}'s own (uid "
                      f"{info.st_uid}'s), and no deliver_as_owner of {rule.where} grants it")
    return fd


def _policy_path(kind: str, path: str) -> int:
    """A path the administrator's policy names (or a granted one): as run opens it."""
    try:
        return paths.open_path(path, trusted=(0,))
    except paths.PathError as err:
        raise Refused(f"filesystem.{kind} {err}") from None


def _require(fd: int, need: int, what: str, peer: Peer) -> None:
    """Inside as_peer: may the peer do `need` (R_OK, W_OK, X_OK) to what fd names?"""
    if not os.access(f"/proc/self/fd/{fd}", need, effective_ids=True):
        verbs = [v for bit, v in ((os.R_OK, "read"), (os.W_OK, "write"),
                                  (os.X_OK, "execute or search")) if need & bit]
        raise Refused(f"{what}: {peer} may not {' and '.join(verbs)} it")


def granted(rule: Rule, path: str) -> bool:
    """Does a deliver_as_owner pattern of the rule match path, component by component (a * is
    never more than one component)?"""
    parts = path.split("/")
    for pattern in rule.deliver_as_owner:
        pieces = pattern.split("/")
        if len(pieces) == len(parts) and all(fnmatch.fnmatchcase(part, piece)
                                             for part, piece in zip(parts, pieces, strict=True)):
            return True
    return False


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
    if kind not in ("lower", "tighten"):  # paths: opened as the peer (opener)
        return
    section, field = key.split(".")
    was = getattr(getattr(base, section), field)
    now = getattr(getattr(policy, section), field)
    if kind == "lower" and now > was:
        raise Refused(f"--set {key}: {now} is above the policy's {was}")
    if kind == "tighten" and was and not now:
        raise Refused(f"--set {key}: the policy's {was} may only be tightened")

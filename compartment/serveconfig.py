"""The resident supervisor's configuration: who may connect, and what each peer may ask for.

Privileged: root reads it (`compartment serve`, `compartment check --serve`), so the file must be
as trusted as root — root's, writable by no one else, and so every directory above it — or it is
an error naming the path.  A missing file means: only root may connect.  It is checked field by
field like a policy; errors name the file, the rule and the key.

    [socket]
    group = "mail"                    # the socket is root:mail 0660 (default: 0666 with rules)

    [[allow]]                         # the first rule that matches the peer applies
    user = "postfix"                  # or group = "mail": one of the two, a name or a number
    policies = ["deliver", "filter"]  # /etc/compartment/policies/NAME.toml, or shipped
    set = ["limits.wall_timeout_s", "filesystem.writable"]  # --set keys it may give
    deliver_as_owner = ["/home/*/Maildir"]  # writable dirs it may name beyond its own
    max_live = 8                      # its compartments at once
    status = true                     # may ask `compartment status`

What a key in `set` allows is fixed here (SETTABLE): limits only lowered below the policy's,
paths only those the peer can open itself (or granted by `deliver_as_owner`), never identity,
seccomp, network, descriptors or the report path of the policy.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compartment import paths
from compartment.policy_fields import NAME_RE

DEFAULT_PATH = "/etc/compartment/serve.toml"

# --set keys a rule may grant, and how the daemon bounds each (compartment.authorize):
# "lower": at most the policy's own value; "tighten": a boolean only turned on; "paths": each path
# opened with the peer's credentials (or granted); "free": the caller's own business.
SETTABLE = {
    **{f"limits.{key}": "lower" for key in ("wall_timeout_s", "cpu_seconds", "memory_bytes",
                                             "file_bytes", "open_files", "processes",
                                             "output_bytes")},
    "filesystem.tmp_bytes": "lower", "message.max_bytes": "lower",
    "filesystem.readable": "paths", "filesystem.writable": "paths",
    "exit.require_full_read": "tighten",
    "exit.violation": "free", "exit.agent_codes": "free", "filter.on_failure": "free",
    "environment.set.*": "free",
}
_RULE_KEYS = {"user", "group", "policies", "set", "deliver_as_owner", "max_live", "status"}


class ConfigError(Exception):
    """The server configuration is not valid: the message names file, rule and key."""


@dataclass(frozen=True)
class Rule:
    where: str  # "serve.toml: allow[1]", for messages
    policies: tuple[str, ...]  # names; ("*",) only for root
    set: tuple[str, ...]
    deliver_as_owner: tuple[str, ...]
    max_live: int
    status: bool
    user: int | None = None
    group: int | None = None

    def allows_set(self, key: str) -> bool:
        if "*" in self.set:
            return True
        return key in self.set or (key.startswith("environment.set.")
                                   and "environment.set.*" in self.set)


ROOT = Rule("root", ("*",), ("*",), (), 1 << 16, True)


@dataclass(frozen=True)
class Config:
    source: str
    rules: tuple[Rule, ...]
    socket_group: int | None = None

    def rule_for(self, uid: int, groups: tuple[int, ...]) -> Rule | None:
        """The rule for a peer (its uid, its gid and supplementary groups); None: refused."""
        if uid == 0:
            return ROOT
        for rule in self.rules:
            if rule.user == uid or (rule.group is not None and rule.group in groups):
                return rule
        return None

    def socket_mode(self) -> int:
        if self.socket_group is not None:
            return 0o660
        return 0o666 if self.rules else 0o600

    def describe(self) -> str:
        """The resolved configuration, as `compartment check --serve` prints it."""
        lines = [f"# server configuration from {self.source}",
                 f"# socket mode {self.socket_mode():04o}" + (
                     f", group {_group_name(self.socket_group)}"
                     if self.socket_group is not None else "")]
        if not self.rules:
            lines.append("# no rules: only root may connect")
        for rule in self.rules:
            who = (f"user = {_user_name(rule.user)}" if rule.user is not None
                   else f"group = {_group_name(rule.group)}")
            lines += [f"\n[[allow]]  # {rule.where}", who,
                      f"policies = {list(rule.policies)}", f"set = {list(rule.set)}",
                      f"deliver_as_owner = {list(rule.deliver_as_owner)}",
                      f"max_live = {rule.max_live}", f"status = {str(rule.status).lower()}"]
        return "\n".join(lines) + "\n"


def load(path: str = DEFAULT_PATH) -> Config:
    try:
        text = _read_trusted(path)
    except FileNotFoundError:
        return Config(f"{path} (missing: only root may connect)", ())
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse(path, document)


def parse(source: str, document: dict[str, Any]) -> Config:
    unknown = set(document) - {"allow", "socket"}
    if unknown:
        raise ConfigError(f"{source}: unknown key {sorted(unknown)[0]!r} (expected allow or "
                          "socket)")
    socket_table = document.get("socket", {})
    if not isinstance(socket_table, dict) or set(socket_table) - {"group"}:
        raise ConfigError(f"{source}: [socket]: expected a table with only group")
    group = socket_table.get("group")
    socket_group = None if group is None else _gid(group, f"{source}: socket.group")
    rules = document.get("allow", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError(f"{source}: allow: expected [[allow]] tables")
    return Config(source, tuple(_rule(f"{source}: allow[{i + 1}]", table)
                                for i, table in enumerate(rules)), socket_group)


def _rule(where: str, table: dict[str, Any]) -> Rule:
    unknown = set(table) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected one of "
                          f"{', '.join(sorted(_RULE_KEYS))})")
    if ("user" in table) == ("group" in table):
        raise ConfigError(f"{where}: give exactly one of user or group")
    user = _uid(table["user"], f"{where}: user") if "user" in table else None
    group = _gid(table["group"], f"{where}: group") if "group" in table else None
    if user == 0:
        raise ConfigError(f"{where}: user: root may always connect; no rule is needed")
    policies = _names(table.get("policies", []), f"{where}: policies")
    for name in policies:
        if not NAME_RE.fullmatch(name) or name.startswith("@"):
            raise ConfigError(f"{where}: policies: {name!r} is not a policy name (a peer names "
                              "policies; files are the administrator's)")
    settable = _names(table.get("set", []), f"{where}: set")
    for key in settable:
        if key not in SETTABLE and not _env_key(key):
            raise ConfigError(f"{where}: set: {key!r} cannot be granted (grantable: "
                              f"{', '.join(SETTABLE)}, environment.set.NAME)")
    patterns = _names(table.get("deliver_as_owner", []), f"{where}: deliver_as_owner")
    for pattern in patterns:
        if not pattern.startswith("/") or ".." in pattern.split("/") or "\0" in pattern:
            raise ConfigError(f"{where}: deliver_as_owner: {pattern!r}: expected an absolute "
                              "path pattern without .. (like /home/*/Maildir)")
    max_live = table.get("max_live", 8)
    if not isinstance(max_live, int) or isinstance(max_live, bool) or not 0 < max_live <= 4096:
        raise ConfigError(f"{where}: max_live: expected a whole number from 1 to 4096")
    status = table.get("status", False)
    if not isinstance(status, bool):
        raise ConfigError(f"{where}: status: expected true or false")
    return Rule(where, policies, settable, tuple(os.path.normpath(p) for p in patterns),
                max_live, status, user, group)


def _env_key(key: str) -> bool:
    name = key.removeprefix("environment.set.")
    return key.startswith("environment.set.") and name.isidentifier() and name.isascii()


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(value)


def _uid(value: Any, where: str) -> int:
    return _id(value, where, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _gid(value: Any, where: str) -> int:
    return _id(value, where, lambda name: grp.getgrnam(name).gr_gid, "group")


def _id(value: Any, where: str, lookup: Callable[[str], int], what: str) -> int:
    """A number, or a name looked up in the password or group file."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 0xFFFFFFFF:
        return value
    if isinstance(value, str):
        try:
            return lookup(value)
        except KeyError:
            raise ConfigError(f"{where}: no {what} named {value!r}") from None
    raise ConfigError(f"{where}: expected a {what} name or a {'uid' if what == 'user' else 'gid'}")


def _user_name(uid: int | None) -> str:
    try:
        return f'"{pwd.getpwuid(uid or 0).pw_name}"  # uid {uid}'
    except KeyError:
        return str(uid)


def _group_name(gid: int | None) -> str:
    try:
        return f'"{grp.getgrgid(gid or 0).gr_name}"  # gid {gid}'
    except KeyError:
        return str(gid)


def _read_trusted(path: str) -> str:
    """The file's text, if it and every directory above it are root's and writable by no one
    else (compartment.paths.open_trusted: resolved once, no link but root's followed)."""
    try:
        fd = paths.open_trusted(path, os.O_RDONLY | os.O_NONBLOCK)
    except paths.PathError as err:
        if err.errno == errno.ENOENT:
            raise FileNotFoundError(path) from None
        raise ConfigError(str(err)) from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file")
        data = file.read(1 << 20)
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None

"""Policies: TOML files loaded and validated into frozen dataclasses.

A policy is trusted configuration written by the administrator, but it is still checked field by
field: an unknown key, a wrong type, a bad unit or a contradiction stops the run before anything
is started, with a message naming the file, the key and the expected form.  Each field below
carries its unit, default and meaning; `compartment check` prints the resolved result, and
docs/policy.md is the reference an administrator reads.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from compartment import paths
from compartment.policy_fields import (
    NAME_RE,
    Bad,
    abspath,
    boolean,
    choice,
    count,
    descriptor,
    env_map,
    env_name,
    etc_name,
    field,
    id_range,
    listing,
    seconds,
    size,
    syscall_name,
    text,
    uid_spec,
)

# The shipped policies: installed beside the package as compartment/policies/ (pyproject maps the
# top-level policies/ there), or the source tree's policies/ for a checkout or an editable install.
_HERE = os.path.dirname(os.path.abspath(__file__))
_SHIPPED = next((d for d in (os.path.join(_HERE, "policies"),
                             os.path.join(os.path.dirname(_HERE), "policies"))
                 if os.path.isdir(d)), os.path.join(_HERE, "policies"))
# The administrator's own, looked up by name before the shipped ones.
ADMIN_POLICIES = "/etc/compartment/policies"


class PolicyError(Exception):
    """A policy could not be loaded: the message names the source, the key and what was wanted."""


@dataclass(frozen=True)
class Filesystem:
    root: str = field(
        choice("system", "empty"), "system",
        '"system": read-only /usr, /bin, /lib*, /sbin and the listed /etc files; '
        '"empty": nothing but what is listed below (static programs)')
    etc: tuple[str, ...] = field(
        listing(etc_name, "names under /etc"),
        ("ld.so.cache", "passwd", "group", "nsswitch.conf", "localtime"),
        "files or directories under /etc shown read-only")
    readable: tuple[str, ...] = field(
        listing(abspath, "absolute paths"), (), "other paths shown read-only at the same place")
    writable: tuple[str, ...] = field(
        listing(abspath, "absolute paths"), (), "directories shown read-write at the same place")
    create_maildir: bool = field(
        boolean, False, "make a missing writable directory as a Maildir (cur, new, tmp), as "
        "the owner of its parent, never as root")
    tmp_bytes: int = field(size, 16 << 20, "bytes of the private tmpfs at /tmp; 0: no /tmp")
    proc: bool = field(boolean, False, "mount a /proc that shows only the compartment")
    devices: tuple[str, ...] = field(
        listing(choice("null", "zero", "urandom", "random", "full"), "device names"),
        ("null", "zero", "urandom"), "devices under /dev")


@dataclass(frozen=True)
class Identity:
    uid: str | int = field(
        uid_spec, "pool", 'as root: "pool" (a fresh uid from uid_pool per compartment), '
        '"owner" (the owner of the first writable directory) or a number')
    gid: str | int = field(
        uid_spec, "pool", 'as root: follows uid for "pool" and "owner", or a number')
    uid_pool: tuple[int, int] = field(
        id_range, (60000, 60999), "uids leased one per live compartment (and gid = uid)")


@dataclass(frozen=True)
class Limits:
    wall_timeout_s: float = field(
        seconds, 300.0, "seconds of wall-clock time before the compartment is killed")
    cpu_seconds: int = field(
        count, 60, "CPU seconds of the whole compartment (cgroup), and of each process "
        "(RLIMIT_CPU)")
    memory_bytes: int = field(
        size, 1 << 30, "memory of the whole compartment in bytes, kernel memory and files in "
        "its /tmp included, no swap (cgroup); address space per process (RLIMIT_AS: this, or "
        "twice this under a cgroup)")
    file_bytes: int = field(size, 64 << 20, "largest file the agent may write (RLIMIT_FSIZE)")
    open_files: int = field(count, 64, "descriptors (RLIMIT_NOFILE)")
    processes: int = field(
        count, 64, "processes and threads of the agent, itself included; 0 or 1: no fork "
        "(cgroup pids.max, the init added; RLIMIT_NPROC per uid)")
    output_bytes: int = field(
        size, 64 << 20, "bytes the agent may write to stdout and stderr")
    enforcement: str = field(
        choice("auto", "cgroup", "rlimits"), "auto",
        '"cgroup": a cgroup per compartment bounds memory, processes and CPU of the whole '
        'compartment (root only; none usable is a configuration error); "rlimits": per-process '
        'and per-uid rlimits only, a weaker mode; "auto": cgroup as root, rlimits unprivileged')


@dataclass(frozen=True)
class Network:
    unix_sockets: bool = field(
        boolean, True, "AF_UNIX sockets allowed; every other family is always a violation, and "
        "the network is empty")


@dataclass(frozen=True)
class Seccomp:
    default: str = field(
        choice("allow", "kill"), "allow",
        'action for syscalls not named: "allow", or "kill" (allow-list mode)')
    allow: tuple[str, ...] = field(
        listing(syscall_name, "syscall names or @groups"), (),
        'syscalls allowed when default = "kill"')
    deny: tuple[str, ...] = field(
        listing(syscall_name, "syscall names or @groups"), (),
        "syscalls that kill the agent, on top of the built-in baseline")


@dataclass(frozen=True)
class Environment:
    set: tuple[tuple[str, str], ...] = field(
        env_map, (("HOME", "/tmp"), ("LANG", "C.UTF-8"), ("PATH", "/usr/bin:/bin"),
                  ("TMPDIR", "/tmp")), "variables the agent gets with fixed values")
    pass_: tuple[str, ...] = field(
        listing(env_name, "variable names"), (),
        "variables copied from the caller's environment when set")


@dataclass(frozen=True)
class Descriptors:
    pass_: tuple[int, ...] = field(
        listing(descriptor, "descriptor numbers"), (),
        "caller descriptors handed to the agent at the same number")


@dataclass(frozen=True)
class Exit:
    agent_codes: str = field(
        choice("caller", "sysexits", "qmail"), "caller",
        'the convention the agent\'s own exit status speaks; "caller": the one the caller '
        "speaks (--exit-codes), so the MTA reads the agent's verdicts as it would unconfined")
    violation: str = field(
        choice("temporary", "permanent"), "temporary",
        "what a seccomp violation is for the caller")
    require_full_read: bool = field(
        boolean, False, "an agent that reports success (0, or a qmail agent's 99) without "
        "reading all of stdin fails temporarily")


@dataclass(frozen=True)
class Message:
    stdin: str = field(
        choice("direct", "memfd", "file"), "direct",
        '"direct": the caller\'s descriptor, read-only; "memfd": a sealed read-only copy '
        '(seekable); "file": a private copy in memory the agent may edit')
    max_bytes: int = field(
        size, 1 << 30, "largest message copied for memfd, file or the filter's spool; larger "
        "is a temporary failure")


@dataclass(frozen=True)
class Filter:
    on_failure: str = field(
        choice("defer", "pass"), "defer",
        '`compartment filter` when the agent fails or writes nothing: "defer" (temporary '
        'failure) or "pass" the original on unchanged')


@dataclass(frozen=True)
class Report:
    path: str = field(text, "", "file to append one JSON line per run to; empty: none")


_SECTIONS: dict[str, type] = {
    "filesystem": Filesystem, "identity": Identity, "limits": Limits, "network": Network,
    "seccomp": Seccomp, "environment": Environment, "descriptors": Descriptors, "exit": Exit,
    "message": Message, "filter": Filter, "report": Report,
}


@dataclass(frozen=True)
class Policy:
    name: str
    source: str
    description: str
    filesystem: Filesystem
    identity: Identity
    limits: Limits
    network: Network
    seccomp: Seccomp
    environment: Environment
    descriptors: Descriptors
    exit: Exit
    message: Message
    filter: Filter
    report: Report

    @classmethod
    def load(cls, name_or_path: str | os.PathLike[str] = "filter",
             overrides: Mapping[str, str] | Iterable[str] = ()) -> Policy:
        """Load a shipped policy by name, or a TOML file by path, then apply KEY=VALUE overrides."""
        name, source, text = _read(os.fspath(name_or_path))
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise PolicyError(f"{source}: not valid TOML: {err}") from None
        for key, value in _pairs(overrides):
            _override(document, key, value)
        return _build(name, source, document)

    def to_toml(self) -> str:
        """The resolved policy, every field shown, as `compartment check` prints it."""
        lines = [f"# policy {self.name} from {self.source}",
                 f"description = {_toml(self.description)}"]
        for section in _SECTIONS:
            lines.append(f"\n[{section}]")
            for spec in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), spec.name)
                lines.append(f"{spec.name.rstrip('_')} = {_toml(value, spec.name)}"
                             f"  # {spec.metadata['doc']}")
        return "\n".join(lines) + "\n"


def shipped() -> dict[str, str]:
    """Name → description of each policy found by name: the administrator's, then those
    installed with the package."""
    found: dict[str, str] = {}
    for directory in (ADMIN_POLICIES, _SHIPPED):
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for name in names:
            if name.endswith(".toml") and name[:-5] not in found:
                with open(os.path.join(directory, name), "rb") as file:
                    found[name[:-5]] = str(tomllib.load(file).get("description", ""))
    return found


def _read(name_or_path: str) -> tuple[str, str, str]:
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        text = _read_trusted(os.path.abspath(name_or_path), missing_ok=False)
        return os.path.basename(name_or_path).removesuffix(".toml"), name_or_path, text or ""
    if not NAME_RE.fullmatch(name_or_path) or name_or_path.startswith("@"):
        raise PolicyError(f"{name_or_path!r}: not a policy name or a path")
    for directory in (ADMIN_POLICIES, _SHIPPED):
        entry = os.path.join(directory, f"{name_or_path}.toml")
        text = _read_trusted(entry, missing_ok=True)
        if text is not None:
            return name_or_path, f"policy {name_or_path} ({entry})", text
    raise PolicyError(f"no policy named {name_or_path!r} (in {ADMIN_POLICIES} or shipped: "
                      f"{', '.join(shipped())}); give a path to use your own file")


def _read_trusted(path: str, missing_ok: bool) -> str | None:
    """A policy decides what an agent may touch and as whom, so whoever can rewrite it chooses
    that: it and every directory above it must belong to root (or to an unprivileged caller
    itself) and be writable by nobody else (compartment.paths.open_trusted)."""
    try:
        fd = paths.open_trusted(path, owners=paths.trusted_owners())
    except paths.PathError as err:
        if missing_ok and err.errno == errno.ENOENT:
            return None
        why = err.why.removeprefix(f"{path}: ")  # the file itself: named once
        raise PolicyError(f"{path}: cannot read policy: {why}") from None
    try:
        with open(fd, encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(f"{path}: cannot read policy: {err}") from None


def _pairs(overrides: Mapping[str, str] | Iterable[str]) -> Iterable[tuple[str, str]]:
    if isinstance(overrides, Mapping):
        yield from overrides.items()
        return
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PolicyError(f"--set {item!r}: expected KEY=VALUE, e.g. limits.cpu_seconds=10")
        yield key, value


def _override(document: dict[str, Any], key: str, text: str) -> None:
    """Apply one --set: VALUE is read as a TOML value when it is one, else as a string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    parts = key.split(".")
    if parts == ["description"]:
        document["description"] = value
        return
    valid = (len(parts) == 2 and parts[0] in _SECTIONS) or \
        (len(parts) == 3 and parts[:2] == ["environment", "set"] and parts[2])
    if not valid:
        raise PolicyError(f"--set {key}: expected SECTION.KEY with a section among "
                          f"{', '.join(_SECTIONS)}, or environment.set.NAME")
    table = document
    for depth, part in enumerate(parts[:-1]):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            where = ".".join(parts[:depth + 1])
            raise PolicyError(f"--set {key}: {where} in the policy is not a table")
    table[parts[-1]] = value


def _build(name: str, source: str, document: dict[str, Any]) -> Policy:
    unknown = set(document) - set(_SECTIONS) - {"description"}
    if unknown:
        raise PolicyError(f"{source}: unknown key {sorted(unknown)[0]!r} (expected description "
                          f"or a section among {', '.join(_SECTIONS)})")
    description = document.get("description", "")
    if not isinstance(description, str):
        raise PolicyError(f"{source}: description: expected a string")
    sections = {key: _section(source, key, cls, document.get(key, {}))
                for key, cls in _SECTIONS.items()}
    policy = Policy(name=name, source=source, description=description, **sections)
    _check_contradictions(policy)
    return policy


def _section(source: str, key: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise PolicyError(f"{source}: [{key}]: expected a table")
    fields = {f.name.rstrip("_"): f for f in dataclasses.fields(cls)}
    values = {}
    for name, value in table.items():
        if name not in fields:
            raise PolicyError(f"{source}: {key}.{name}: unknown key (expected one of "
                              f"{', '.join(fields)})")
        try:
            values[fields[name].name] = fields[name].metadata["parse"](value)
        except Bad as bad:
            raise PolicyError(f"{source}: {key}.{name}: expected {bad}, got {value!r}") from None
    return cls(**values)


def _check_contradictions(policy: Policy) -> None:
    fs, seccomp, identity = policy.filesystem, policy.seccomp, policy.identity

    def fail(what: str) -> None:
        raise PolicyError(f"{policy.source}: {what}")

    if fs.root == "empty" and fs.etc:
        fail('filesystem.etc: an "empty" root shows no /etc files; remove them or use "system"')
    if seccomp.default == "allow" and seccomp.allow:
        fail('seccomp.allow: only meaningful with seccomp.default = "kill"')
    both = set(seccomp.allow) & set(seccomp.deny)
    if both:
        fail(f"seccomp: {sorted(both)[0]!r} is both allowed and denied")
    if identity.uid == "owner" and not fs.writable:
        fail('identity.uid: "owner" needs a filesystem.writable directory to take the owner '
             "from; give it with --set filesystem.writable=DIR")
    if isinstance(identity.uid, int) != isinstance(identity.gid, int):
        fail("identity: a numeric uid needs a numeric gid, and pool/owner take gid = "
             '"pool"')
    overlap = set(fs.writable) & set(fs.readable)
    if overlap:
        fail(f"filesystem: {sorted(overlap)[0]} is both readable and writable")


def _toml(value: Any, field_name: str = "") -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if field_name == "uid_pool":
        return f'"{value[0]}-{value[1]}"'
    if value and isinstance(value[0], tuple):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value) + " }"
    return "[" + ", ".join(_toml(v) for v in value) + "]"

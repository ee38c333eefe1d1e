"""`compartment audit`: what a policy allows, line by line, and an exposure score from 0 to 10.

A policy tool, pure: a function over a loaded Policy (no file, process or kernel is looked
at), in the manner of `systemd-analyze security`.  Each line is one thing the policy decides,
with a weight (how much it matters) and an exposure from 0 (closed) to 1 (open); the score is
10 x (sum of weight x exposure) / (sum of weights).  The lines every compartment holds
whatever its policy (no capabilities, its own namespaces, the syscall baseline, no network)
weigh in with exposure 0: they are what an unconfined process lacks, so 10 means unconfined
and no policy reaches it.  The policy format cannot open the network today, so that line reads
0 for every policy; AF_UNIX sockets have a line of their own.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass

from compartment.policy import Limits, Policy

# /etc names that tell the program nothing about the host's users or services.
_HARMLESS_ETC = {"ld.so.cache", "localtime", "mime.types", "nsswitch.conf", "host.conf",
                 "protocols", "services", "hostname", "timezone", "magic", "mailcap"}
_ACCOUNTS_ETC = {"passwd", "group"}
# Places whose whole tree holds other users' data or the system's configuration.
BROAD_DIRECTORIES = {"/", "/home", "/root", "/var", "/etc", "/srv", "/usr", "/tmp", "/opt",
                     "/run", "/var/mail", "/var/spool", "/var/lib", "/var/cache", "/var/log",
                     "/var/tmp", "/usr/local"}
_PROCESS_CALLS = {"fork", "vfork", "clone"}
_SETTING_WIDTH = 48
_RATINGS = ((1.0, "tight"), (2.0, "moderate"), (4.0, "exposed"), (math.inf, "unsafe"))
# Limits compared with the defaults (limits.processes has a line of its own).
_LIMITS = ("wall_timeout_s", "cpu_seconds", "memory_bytes", "file_bytes", "open_files",
           "output_bytes")


@dataclass(frozen=True)
class Line:
    area: str
    setting: str
    weight: float
    exposure: float  # 0 (closed) to 1 (open)
    reason: str


@dataclass(frozen=True)
class Audit:
    policy: str
    source: str
    lines: tuple[Line, ...]

    @property
    def exposure(self) -> float:
        """From 0 (closed) to 10 (unconfined), unrounded: for comparing policies."""
        total = sum(line.weight for line in self.lines)
        return 10 * sum(line.weight * line.exposure for line in self.lines) / total

    @property
    def score(self) -> float:
        """The exposure as shown, to one decimal; --max-exposure compares this one."""
        return round(self.exposure, 1)

    @property
    def rating(self) -> str:
        return next(name for bound, name in _RATINGS if self.score < bound)

    def to_dict(self) -> dict[str, object]:
        return {"policy": self.policy, "source": self.source, "exposure": self.score,
                "rating": self.rating, "lines": [asdict(line) for line in self.lines]}

    def table(self) -> str:
        """One row per line; a long setting wraps within its column."""
        width = min(_SETTING_WIDTH, max(len(line.setting) for line in self.lines))
        out = [f"{'AREA':13} {'SETTING':{width}} WEIGHT EXPOSURE  WHY"]
        for line in self.lines:
            setting = textwrap.wrap(line.setting, width, break_on_hyphens=False) or [""]
            out.append(f"{line.area:13} {setting[0]:{width}} {line.weight:6.2f} "
                       f"{line.exposure:8.2f}  {line.reason}")
            out += [f"{'':13} {more}" for more in setting[1:]]
        out.append(f"exposure {self.score:.1f} of 10 ({self.rating}) for {self.source}")
        return "\n".join(out) + "\n"


def audit(policy: Policy) -> Audit:
    lines = [*_always(), *_filesystem(policy), *_kernel(policy), _identity(policy),
             *_limits(policy), _descriptors(policy), _environment(policy)]
    return Audit(policy.name, policy.source, tuple(lines))


def _always() -> list[Line]:
    return [
        Line("capabilities", "none; no_new_privs; no set-id files (always)", 2.0, 0.0,
             "with one, or a set-id program, the whole host is in reach"),
        Line("namespaces", "own mount, pid, ipc, uts, network (always)", 1.5, 0.0,
             "else it sees and signals the host's processes and mounts"),
        Line("baseline", "mount, ptrace, bpf, keyring, modules... refused (always)", 1.5, 0.0,
             "kernel interfaces that reach beyond a compartment"),
        Line("network", "empty namespace; only AF_UNIX sockets (always)", 2.0, 0.0,
             "how data leaves the host; no policy can open it today"),
    ]


def _filesystem(policy: Policy) -> list[Line]:
    fs = policy.filesystem
    etc = sum(0.0 if name in _HARMLESS_ETC else 0.3 if name in _ACCOUNTS_ETC
              else 0.25 if "/" not in name and "." not in name else 0.15 for name in fs.etc)
    readable = sum(1.0 if path in BROAD_DIRECTORIES else 0.6 if _in_home(path) else 0.3
                   for path in fs.readable)
    writable = sum(1.0 if path in BROAD_DIRECTORIES or is_home(path) else 0.4
                   for path in fs.writable)
    tmp = 0.0 if not fs.tmp_bytes else 0.3 + 0.7 * min(1.0, fs.tmp_bytes / (256 << 20))
    return [
        Line("root", fs.root, 1.0, 0.3 if fs.root == "system" else 0.0,
             "read-only /usr, /bin, /lib*: the host's software and versions"),
        Line("etc", _listing(fs.etc), 1.0, min(1.0, etc),
             "passwd and group name the accounts; other files, the services"),
        Line("readable", _listing(fs.readable), 1.5, min(1.0, readable),
             "host data it can read and copy into its output"),
        Line("writable", _listing(fs.writable), 3.0, min(1.0, writable),
             "what it can change on the host; a home holds dotfiles that run code"),
        Line("tmp", _bytes(fs.tmp_bytes) if fs.tmp_bytes else "none", 0.5, tmp,
             "a tmpfs is kernel memory outside RLIMIT_AS, up to its size"),
        Line("devices", _listing(fs.devices), 0.5, min(1.0, 0.15 * len(fs.devices)),
             "each device is a driver's interface to the kernel"),
        Line("proc", "mounted" if fs.proc else "none", 1.0, 1.0 if fs.proc else 0.0,
             "/proc/sys, kernel version, CPU and memory details to probe"),
    ]


def _kernel(policy: Policy) -> list[Line]:
    spec, limits = policy.seccomp, policy.limits
    if spec.default == "kill":
        calls = Line("syscalls", f"allow-list of {len(spec.allow)} + @basic", 2.0,
                     0.1 + min(0.3, 0.01 * len(spec.allow)),
                     "only the calls it uses reach the kernel")
    else:
        others = [name for name in spec.deny if name not in _PROCESS_CALLS | {"execveat"}]
        closed = 0.25 * _PROCESS_CALLS.issubset(spec.deny) + min(0.15, 0.05 * len(others))
        calls = Line("syscalls", "all beyond the baseline" + (f"; denied: {', '.join(spec.deny)}"
                                                              if spec.deny else ""),
                     2.0, 0.6 - closed, "every call allowed is kernel code within reach")
    forks = limits.processes > 0 and not (spec.default == "allow"
                                          and _PROCESS_CALLS.issubset(spec.deny))
    return [
        calls,
        Line("processes", str(limits.processes) if forks else "none (no fork)", 1.0,
             min(1.0, limits.processes / 64) if forks else 0.0,
             "programs it runs besides itself, and its share of the machine"),
        Line("unix sockets", "allowed" if policy.network.unix_sockets else "refused", 0.5,
             1.0 if policy.network.unix_sockets else 0.0,
             "a socket file shown read-only can still be connected to"),
    ]


def _identity(policy: Policy) -> Line:
    uid = policy.identity.uid
    if uid == "pool":
        return Line("identity", "a pool uid of its own", 1.5, 0.0,
                    "no other process or file on the host has its uid")
    if uid == "owner":
        return Line("identity", "the writable directory's owner", 1.5, 0.5,
                    "all the owner's files the root shows are its to change")
    return Line("identity", f"uid {uid}, gid {policy.identity.gid}", 1.5, 0.7,
                "shared with whatever else runs as that uid")


def _limits(policy: Policy) -> list[Line]:
    defaults = Limits()
    lines = []
    for name in _LIMITS:
        value, default = getattr(policy.limits, name), getattr(defaults, name)
        over = 0.0 if value <= default else min(1.0, math.log2(value / default) / 3)
        lines.append(Line("limits", f"{name} {_amount(name, value)} (default "
                          f"{_amount(name, default)})", 0.25, over,
                          "above the default: more of the machine per message"))
    return lines


def _descriptors(policy: Policy) -> Line:
    passed = policy.descriptors.pass_
    return Line("descriptors", _listing([str(fd) for fd in passed]), 1.0,
                1.0 if passed else 0.0, "the caller's own files or sockets, whatever they are")


def _environment(policy: Policy) -> Line:
    names = policy.environment.pass_
    return Line("environment", f"{len(names)} variables passed" if names else "none passed",
                0.0, 0.0, "data it reads, not a capability: weight 0")


def _listing(items: tuple[str, ...] | list[str]) -> str:
    return ", ".join(items) if items else "none"


def _amount(name: str, value: float) -> str:
    return _bytes(int(value)) if name.endswith("_bytes") else f"{value:g}"


def _bytes(value: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def _in_home(path: str) -> bool:
    return path.startswith(("/home/", "/root/"))


def is_home(path: str) -> bool:
    """A home directory itself (/home/NAME, /root): lexically, as audit reads no file."""
    parts = path.strip("/").split("/")
    return (parts[0] == "home" and len(parts) <= 2) or parts[0] == "root"

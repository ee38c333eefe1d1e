"""From the evidence to a policy: the smallest change from the base, each change with its reason.

Policy tool (`compartment learn`), pure: the base policy's document, the policy and root plan
the samples ran under, and the Evidence in; a Proposal out (changed keys, each with the call
and sample that decided it, and notes on what could not be learned).  What is learned:

- filesystem: paths the program looked for that the root did not show and the host has become
  `etc` names or `readable` paths (never writable ones); /etc names, readable paths, devices,
  /tmp and /proc of the base that no sample used are dropped;
- network: `unix_sockets` is what the samples did with AF_UNIX;
- seccomp: a call the base refuses that a sample made leaves `deny` (or joins `allow` in
  allow-list mode); when no sample started a process or thread, fork, vfork, clone and
  execveat join `deny`, as in the shipped tool profiles;
- limits: what the samples used, with the headroom below, never under a floor.

Values given with --set during learning are per run (a mailbox, a key file): the proposal keeps
the base's, and what they showed counts as shown.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from compartment import rootfs
from compartment.audit import BROAD_DIRECTORIES, is_home
from compartment.learn.evidence import Evidence, Use
from compartment.policy import Filesystem, Limits, Network, Policy, Seccomp
from compartment.syscall_filter import GROUPS

MiB = 1 << 20
# Limit headroom: a multiple of the largest use over the samples, and the least ever proposed.
HEADROOM = {"cpu_seconds": 4, "wall_timeout_s": 4, "memory_bytes": 2, "output_bytes": 2,
            "open_files": 2, "processes": 2}
FLOOR = {"cpu_seconds": 10, "wall_timeout_s": 60, "memory_bytes": 64 * MiB,
         "output_bytes": MiB, "open_files": 16, "processes": 4}
PROCESS_DENY = ("fork", "vfork", "clone", "execveat")
# A link in a writable directory may point whoever reads it later somewhere else.
LINK_DENY = ("link", "linkat", "symlink", "symlinkat")
# Paths never proposed, with the reason the note gives.
NEVER_SHOWN = {
    "/etc/resolv.conf": "the resolver's configuration: a compartment has no network, so shown "
                        "it the program only tries a socket, which is always a violation",
}
_SECTIONS = {"filesystem": Filesystem, "limits": Limits, "network": Network,
             "seccomp": Seccomp}


@dataclass
class Change:
    value: Any
    why: list[str]  # comment lines above the key
    items: dict[str, str] = field(default_factory=dict)  # list item -> its comment


@dataclass
class Proposal:
    base: dict[str, Any]  # the base policy's TOML document, as its file has it
    changes: dict[tuple[str, str], Change] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def base_value(self, section: str, key: str) -> Any:
        """The base's value of a key, resolved as the loader would (or the default)."""
        spec = next(f for f in dataclasses.fields(_SECTIONS[section]) if f.name.rstrip("_") == key)
        table = self.base.get(section, {})
        return spec.metadata["parse"](table[key]) if key in table else spec.default

    def change(self, section: str, key: str, value: Any, why: list[str],
               items: dict[str, str] | None = None) -> None:
        """Propose `value` (as a document holds it) for a key, if it is not the base's."""
        spec = next(f for f in dataclasses.fields(_SECTIONS[section]) if f.name.rstrip("_") == key)
        if spec.metadata["parse"](value) != self.base_value(section, key):
            self.changes[(section, key)] = Change(value, why, items or {})


def propose(base: dict[str, Any], policy: Policy, plan: rootfs.Plan, program: str,
            ev: Evidence) -> Proposal:
    proposal = Proposal(base)
    _filesystem(proposal, policy, plan, program, ev)
    _network(proposal, policy, ev)
    _seccomp(proposal, policy, ev)
    _limits(proposal, ev)
    _caveats(proposal, policy, ev)
    return proposal


# --- filesystem --------------------------------------------------------------------------------

@dataclass
class _Paths:
    added: dict[str, dict[str, str]] = field(
        default_factory=lambda: {"etc": {}, "readable": {}, "devices": {}})
    candidates: dict[str, Use] = field(default_factory=dict)  # hidden host paths to show
    shown: list[str] = field(default_factory=list)  # paths the root showed
    missing: dict[str, list[str]] = field(default_factory=dict)  # host ancestor -> paths
    tmp: Use | None = None  # a use of /tmp when the root had none
    private_tmp: Use | None = None  # a use of the root's own /tmp (not of a path shown in it)


def _filesystem(p: Proposal, policy: Policy, plan: rootfs.Plan, program: str,
                ev: Evidence) -> None:
    fs, found = policy.filesystem, _Paths()
    for path, use in sorted(ev.paths.items()):
        _place(p, fs, plan, program, path, use, ev, found)
    _choose(p, fs, plan, found)
    _listed(p, "etc", [f"/etc/{name}" for name in p.base_value("filesystem", "etc")],
            found, ev, prefix="/etc/")
    _listed(p, "readable", list(p.base_value("filesystem", "readable")), found, ev)
    _listed(p, "devices", [f"/dev/{name}" for name in p.base_value("filesystem", "devices")],
            found, ev, prefix="/dev/")
    _tmp_and_proc(p, fs, found)
    for ancestor, paths in sorted(found.missing.items()):
        example = paths[0] if len(paths) == 1 else f"{len(paths)} paths, e.g. {paths[0]}"
        p.notes.append(f"looked for {example} under {ancestor}, which this host lacks too: "
                       "nothing to show")


def _place(p: Proposal, fs: Filesystem, plan: rootfs.Plan, program: str, path: str,
           use: Use, ev: Evidence, found: _Paths) -> None:
    """Decide one path: shown already, to be shown, or a note."""
    if _shows(fs, plan, program, path):
        found.shown.append(path)
        private = not plan.shows(path) and path not in plan.directories
        if path.startswith("/tmp/") and private and found.private_tmp is None:
            found.private_tmp = use
        if path in ev.writes and not _writable(fs, path):
            p.notes.append(f"{ev.writes[path]}: tried to change a read-only path; not "
                           "proposed (a writable directory is given per run with --set "
                           "filesystem.writable=DIR)")
        return
    top = path.split("/")[1]
    if top == "tmp":
        found.tmp = found.tmp or use
    elif top in ("proc", "sys"):
        p.notes.append(f"{use}: /{top} is not the host's in a compartment; not proposed "
                       + ("(filesystem.proc = true mounts the compartment's own /proc; "
                          "the program ran without it)" if top == "proc" else
                          "(a compartment never shows /sys)"))
    elif top == "dev":
        name = path[len("/dev/"):]
        if name in ("null", "zero", "urandom", "random", "full"):
            found.added["devices"][name] = f"added: {use}"
        else:
            p.notes.append(f"{use}: not a device a policy can show; not proposed")
    elif not os.path.lexists(path):
        ancestor = _existing_ancestor(path)
        found.missing.setdefault(ancestor, []).append(path)
    else:
        _host_path(p, fs, path, use, ev, found)


def _host_path(p: Proposal, fs: Filesystem, path: str, use: Use, ev: Evidence,
               found: _Paths) -> None:
    """A path the root hid and the host has: a candidate to show read-only, or a note why
    not."""
    reason = NEVER_SHOWN.get(path)
    if not path.isprintable() or not _utf8(path):
        reason = "a policy can only name a printable UTF-8 path"
    elif reason is None and os.path.isdir(path) and (
            path.count("/") == 1 or path in BROAD_DIRECTORIES or is_home(path)):
        reason = (f"{path} is a whole directory of the system or of other users; if the "
                  "program needs something in it, show that path alone")
    elif reason is None and path in ev.writes:
        reason = ("the program would change it, and learn never proposes a writable path "
                  "(give one per run with --set filesystem.writable=DIR)")
    elif reason is None and not _others_may_read(path):
        reason = "others may not read it on the host: the agent's uid could not read it shown"
    if reason:
        p.notes.append(f"{use}: the root hid it; not proposed: {reason}")
    else:
        found.candidates[path] = use


def _choose(p: Proposal, fs: Filesystem, plan: rootfs.Plan, found: _Paths) -> None:
    """The candidates to show: not a link to a place shown or proposed, not under a proposed
    directory (which shows it already)."""
    candidates = dict(found.candidates)
    for path, use in found.candidates.items():
        target = os.path.realpath(path)
        if target != path and (target in candidates or _shows(fs, plan, "", target)):
            del candidates[path]
            p.notes.append(f"{use}: a link to {target}, which the proposal shows: not proposed")
    for path, use in sorted(candidates.items()):
        if any(path.startswith(other + "/") for other in candidates):
            continue
        kind = "etc" if fs.root == "system" and path.startswith("/etc/") else "readable"
        item = path[len("/etc/"):] if kind == "etc" else path
        directory = os.path.isdir(path)
        found.added[kind][item] = f"added: {use}" + (" (a directory)" if directory else "")
        if directory:
            p.notes.append(f"{path} was hidden from the program, so what it reads inside was "
                           "not seen: learn again with this proposal as the base (-p FILE)")


def _listed(p: Proposal, key: str, base_paths: list[str], found: _Paths, ev: Evidence,
            prefix: str = "") -> None:
    """A list of shown paths: the base's that a sample used, then the added ones."""
    kept, dropped, items = [], [], {}
    for path in base_paths:
        use = next((ev.paths[seen] for seen in found.shown
                    if seen == path or seen.startswith(path + "/")), None)
        name = path[len(prefix):]
        if use is None:
            dropped.append(name)
        else:
            kept.append(name)
            items[name] = f"kept: {use}"
    items.update(found.added[key])
    why = [f"learned: {', '.join(dropped)} opened by no sample: removed"] if dropped else []
    if found.added[key]:
        why.append("learned: the root hid what is marked added, and the host has it")
    p.change("filesystem", key, [*kept, *found.added[key]], why, items)


def _tmp_and_proc(p: Proposal, fs: Filesystem, found: _Paths) -> None:
    if found.tmp and not fs.tmp_bytes:
        size = p.base_value("filesystem", "tmp_bytes") or Filesystem.tmp_bytes
        p.change("filesystem", "tmp_bytes", f"{size // MiB}M",
                 [f"learned: {found.tmp}: the root had no /tmp (the size is the default: "
                  "raise it for large messages)"])
    elif found.private_tmp is None and found.tmp is None:
        p.change("filesystem", "tmp_bytes", 0, ["learned: no sample used /tmp"])
    if p.base_value("filesystem", "proc") and not any(path.startswith("/proc/")
                                                      for path in found.shown):
        p.change("filesystem", "proc", False, ["learned: no sample looked at /proc"])


def _shows(fs: Filesystem, plan: rootfs.Plan, program: str, path: str) -> bool:
    if path in ("/", program) or path in plan.directories or plan.shows(path):
        return True
    if any(entry.target == path for entry in plan.entries):  # a link such as /bin -> usr/bin
        return True
    under = path.split("/")[1]
    return (under == "tmp" and fs.tmp_bytes > 0) or (under == "proc" and fs.proc)


def _writable(fs: Filesystem, path: str) -> bool:
    places = [*fs.writable, "/dev", *(["/tmp"] if fs.tmp_bytes else [])]
    return any(path == place or path.startswith(place + "/") for place in places)


def _utf8(path: str) -> bool:
    try:
        path.encode()
    except UnicodeEncodeError:  # bytes that were not UTF-8, kept as surrogates
        return False
    return True


def _existing_ancestor(path: str) -> str:
    while path != "/" and not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def _others_may_read(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # a dangling link: nothing to show
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return mode & need == need


# --- network and seccomp -----------------------------------------------------------------------

def _network(p: Proposal, policy: Policy, ev: Evidence) -> None:
    allow_list = policy.seccomp.default == "kill"
    use = ev.sockets.get("socket(AF_UNIX)") or (ev.sockets.get("socketpair(AF_UNIX)")
                                                if allow_list else None)
    why = [f"learned: {use}"] if use else ["learned: no sample made an AF_UNIX socket"]
    p.change("network", "unix_sockets", use is not None, why)


def _seccomp(p: Proposal, policy: Policy, ev: Evidence) -> None:
    refused = {name: use for name, use in ev.refused.items()
               if name not in ("socket", "socketpair")}  # those are network.unix_sockets
    if policy.seccomp.default == "kill":
        allow = list(p.base_value("seccomp", "allow"))
        added = {name: f"added: {use}" for name, use in sorted(refused.items())
                 if name not in allow}
        p.change("seccomp", "allow", allow + list(added), ["learned: the allow-list held "
                 "what is marked added, which a sample called"], added)
        return
    deny, why, items = [], [], {}
    for entry in p.base_value("seccomp", "deny"):
        members = GROUPS.get(entry, (entry,)) if entry.startswith("@") else (entry,)
        used = [name for name in members if name in refused]
        if not used:
            deny.append(entry)
            continue
        deny += [name for name in members if name not in refused] if entry.startswith("@") \
            else []
        why += [f"learned: {name} removed from deny: {refused[name]}" for name in used]
    unused = {name: "added: no sample started a process or thread"
              for name in PROCESS_DENY if ev.process is None}
    if policy.filesystem.writable:
        unused |= {name: "added: no sample made a link, and a writable directory is shown"
                   for name in LINK_DENY if name not in ev.calls}
    for name, why_added in unused.items():
        if name not in deny:
            deny.append(name)
            items[name] = why_added
    p.change("seccomp", "deny", deny, why, items)


# --- limits ------------------------------------------------------------------------------------

def _limits(p: Proposal, ev: Evidence) -> None:
    if ev.peak_processes > 1:
        p.change("limits", "processes", _headroom("processes", ev.peak_processes),
                 [f"learned: {ev.peak_processes} processes and threads at once at most, "
                  f"x{HEADROOM['processes']} (first: {ev.process})"])
    else:
        p.change("limits", "processes", 0, ["learned: no sample started a process or thread"])
    if ev.ended:
        # A run that failed may have stopped before the real work: its use measures nothing.
        p.notes.append("not every sample ended ok, so the other limits stay the base's: learn "
                       "again (with this proposal as the base) on samples the program accepts")
        return
    need = {"cpu_seconds": ev.cpu_s, "wall_timeout_s": ev.wall_s,
            "memory_bytes": ev.peak_vm_bytes, "open_files": ev.descriptors}
    for key, used in need.items():
        if used:  # 0: not measured (no process ended by itself), the base's stays
            value = _headroom(key, used)
            p.change("limits", key, _unit(key, value),
                     [f"learned: {_shown(key, used)} at most over the samples; "
                      f"x{HEADROOM[key]}, and at least {_unit(key, FLOOR[key])}"])
    _output_and_files(p, ev)


def _output_and_files(p: Proposal, ev: Evidence) -> None:
    if ev.echoes_message:
        p.notes.append("the program writes the message back (its output was at least half "
                       "its input): limits.output_bytes stays the base's, which bounds your "
                       "largest message")
    else:
        value = _headroom("output_bytes", ev.bytes_out)
        p.change("limits", "output_bytes", _unit("output_bytes", value),
                 [f"learned: {ev.bytes_out} bytes of output at most over the samples; "
                  f"x{HEADROOM['output_bytes']}, and at least 1M"])
    if not ev.writes:
        p.change("limits", "file_bytes", 0, ["learned: no sample wrote a file"])


def _headroom(key: str, used: float) -> int:
    value = max(FLOOR[key], math.ceil(used * HEADROOM[key]))
    if key in ("memory_bytes", "output_bytes"):
        return -(-value // MiB) * MiB
    if key == "open_files":
        return 1 << (value - 1).bit_length()
    return value


def _unit(key: str, value: int) -> int | str:
    return f"{value // MiB}M" if key.endswith("_bytes") else value


def _shown(key: str, value: float) -> str:
    """A measurement in words: what the samples used of the limit `key`."""
    return {"cpu_seconds": f"{value:.2g} s of CPU", "wall_timeout_s": f"{value:.2g} s",
            "memory_bytes": f"{value / MiB:.1f} MiB of address space (VmPeak)",
            "open_files": f"{int(value)} descriptors (the highest number in use, plus one)",
            }[key]


# --- what could not be learned -----------------------------------------------------------------

def _caveats(p: Proposal, policy: Policy, ev: Evidence) -> None:
    for use in ev.walls.values():
        p.notes.append(f"{use}: no policy allows it (the built-in baseline); learning refused "
                       "it with EPERM and the program went on, but under any policy this "
                       "sample is a seccomp violation, a temporary failure")
    for sample, ended in ev.ended.items():
        p.notes.append(f"sample {sample} ended with {ended}: if that is not the program's "
                       "normal answer, it stopped early and what it would do after was not "
                       "seen")
    for key, sample in ev.limits_hit.items():
        p.notes.append(f"sample {sample} was stopped by limits.{key}: that limit stays the "
                       "base's; raise it in the base and learn again")
    if ev.unreadable:
        p.notes.append(f"{ev.unreadable} calls' paths could not be read (their task was gone)")
    added = p.changes[("seccomp", "deny")].items if ("seccomp", "deny") in p.changes else {}
    for names, what in ((PROCESS_DENY, "started a process"), (LINK_DENY, "made a link")):
        if any(name in added for name in names):
            p.notes.append(f"no sample {what}, so one is now a violation: a call taken only "
                           "on an error path or for an unusual message was not seen (ripmime "
                           "links a part whose name is taken), and such a message would be "
                           "deferred")
    if policy.seccomp.default == "kill":
        p.notes.append("the allow-list holds only the calls these samples made: a call taken "
                       "only on an error path was not seen and would be a violation")
    p.notes.append("limits grow with the message for a program that holds it: learn with a "
                   "sample as large as the largest message you accept")
    p.notes.append("[environment] is the base's: which variables the program reads cannot be "
                   "seen (getenv is not a syscall)")

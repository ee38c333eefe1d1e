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
from dataclasses import dataclass, field
from typing import Any

from compartment import rootfs
from compartment.learn import filesystem
from compartment.learn.evidence import Evidence
from compartment.learn.listener import MAX_PATHS
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
    filesystem.decide(proposal, policy, plan, program, ev)
    _network(proposal, policy, ev)
    _seccomp(proposal, policy, ev)
    _limits(proposal, ev)
    _caveats(proposal, policy, ev)
    return proposal


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
                      f"x{HEADROOM[key]}, and at least {_unit(key, FLOOR[key])}"
                      f"{' s' if key in ('cpu_seconds', 'wall_timeout_s') else ''}"])
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
    walls: dict[str, list[str]] = {}
    for use in ev.walls.values():
        walls.setdefault(use.sample, []).append(use.what)
    for sample, tries in walls.items():
        p.notes.append(f"{', '.join(tries)} (sample {sample}): no policy allows these (the "
                       "built-in baseline); learning refused them with EPERM and the program "
                       "went on, but under any policy this sample is a seccomp violation, a "
                       "temporary failure")
    for sample, ended in ev.ended.items():
        p.notes.append(f"sample {sample} ended with {ended}: if that is not the program's "
                       "normal answer, it stopped early and what it would do after was not "
                       "seen")
    for key, sample in ev.limits_hit.items():
        p.notes.append(f"sample {sample} was stopped by limits.{key}: that limit stays the "
                       "base's; raise it in the base and learn again")
    if ev.unreadable:
        p.notes.append(f"{ev.unreadable} calls' paths could not be read (the task was gone, "
                       "or, unprivileged, its memory was closed to us before the program's "
                       "own exec)")
    if ev.paths_dropped:
        p.notes.append(f"{ev.paths_dropped} paths past the first {MAX_PATHS} of a sample were "
                       "not recorded")
    added = p.changes[("seccomp", "deny")].items if ("seccomp", "deny") in p.changes else {}
    for names, what, example in (
            (PROCESS_DENY, "started a process", "a filter that runs a helper for one kind of "
                                                "attachment"),
            (LINK_DENY, "made a link", "ripmime links a part whose name is taken")):
        if any(name in added for name in names):
            p.notes.append(f"no sample {what}, so one is now a violation: a call taken only "
                           f"on an error path or for an unusual message was not seen ({example})"
                           ", and such a message would be deferred")
    if policy.seccomp.default == "kill":
        p.notes.append("the allow-list holds only the calls these samples made: a call taken "
                       "only on an error path was not seen and would be a violation")
    p.notes.append("limits grow with the message for a program that holds it: learn with a "
                   "sample as large as the largest message you accept")
    p.notes.append("[environment] is the base's: which variables the program reads cannot be "
                   "seen (getenv is not a syscall)")

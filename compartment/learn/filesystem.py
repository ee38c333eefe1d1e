"""What a proposal shows of the host: the [filesystem] part of `compartment learn`.

Policy tool, pure but for looking at the host's paths (whether one exists, is a directory, a
link, readable by others).  Each path a sample named is either shown by the root it ran in
(then it keeps the `etc` name, `readable` path, device, /tmp or /proc that showed it), or hidden:
then, if the host has it, others may read it, and it is neither a whole directory of the
system or of other users nor a path the program would change, it is proposed read-only
(`etc` under a system root, `readable` otherwise); else a note says why not.  Paths both hidden
and absent from the host are noted, grouped under the nearest directory the host has.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compartment import rootfs
from compartment.audit import BROAD_DIRECTORIES, is_home
from compartment.learn.evidence import Evidence, Use
from compartment.policy import Filesystem, Policy

if TYPE_CHECKING:
    from compartment.learn.proposal import Proposal

MiB = 1 << 20
DEVICES = ("null", "zero", "urandom", "random", "full")
# Paths never proposed, with the reason the note gives.
NEVER_SHOWN = {
    "/etc/resolv.conf": "the resolver's configuration: a compartment has no network, so shown "
                        "it the program only tries a socket, which is always a violation",
}

@dataclass
class _Paths:
    added: dict[str, dict[str, str]] = field(
        default_factory=lambda: {"etc": {}, "readable": {}, "devices": {}})
    candidates: dict[str, Use] = field(default_factory=dict)  # hidden host paths to show
    shown: list[str] = field(default_factory=list)  # paths the root showed
    missing: dict[str, list[str]] = field(default_factory=dict)  # host ancestor -> paths
    tmp: Use | None = None  # a use of /tmp when the root had none
    private_tmp: Use | None = None  # a use of the root's own /tmp (not of a path shown in it)


def decide(p: Proposal, policy: Policy, plan: rootfs.Plan, program: str,
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
        if name in DEVICES:
            found.added["devices"][name] = f"added: {use}"
        else:
            p.notes.append(f"{use}: not a device a policy can show; not proposed")
    elif path in ev.writes:
        p.notes.append(f"{ev.writes[path]}: the root hid it; not proposed: the program would "
                       "change it, and learn never proposes a writable path (give one per run "
                       "with --set filesystem.writable=DIR)")
    elif not os.path.lexists(path):
        ancestor = _existing_ancestor(path)
        found.missing.setdefault(ancestor, []).append(path)
    else:
        _host_path(p, path, use, found)


def _host_path(p: Proposal, path: str, use: Use, found: _Paths) -> None:
    """A path the root hid and the host has: a candidate to show read-only, or a note why
    not."""
    reason = NEVER_SHOWN.get(path)
    if not path.isprintable() or not _utf8(path):
        reason = "a policy can only name a printable UTF-8 path"
    elif reason is None and os.path.isdir(path) and (
            path.count("/") == 1 or path in BROAD_DIRECTORIES or is_home(path)):
        reason = (f"{path} is a whole directory of the system or of other users; if the "
                  "program needs something in it, show that path alone")
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

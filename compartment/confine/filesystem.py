"""Filesystem: a new root built from nothing, then pivot_root into it.

Parent side (`prepare`, root): the paths a policy names and the program were opened once by the
supervisor (compartment.paths); each becomes a detached copy of its mount (open_tree), which the
child attaches, so what is mounted is exactly what the decisions were made on.  An unprivileged
supervisor cannot make detached mounts: its child opens the path again and refuses to go on
unless it finds the very file (device and inode) the supervisor decided on.  A mount cannot be
made from a descriptor of another mount namespace, or the child would mount the descriptor
itself.

Child side, in the new mount namespace, privileged, following the plan made in the parent
(compartment.rootfs): stop mount propagation, open every source first (the staging tmpfs at
/tmp would hide sources below /tmp), build the tree on a small tmpfs (small world-readable /etc
files copied, not bound), make it read-only, pivot_root into it and detach the old root.  Every
bind is remounted nosuid and nodev; read-only binds keep the flags the kernel locks (noexec,
atime) in a user namespace, or the remount would fail.
"""

from __future__ import annotations

import os
from dataclasses import replace

from compartment import syscalls
from compartment.confine.errors import SetupError, fail
from compartment.rootfs import Entry, Plan

STEP = "filesystem"
STAGE = "/tmp"


def prepare(fs: Plan) -> tuple[Plan, list[int]]:
    """Parent side, root: the plan with a detached mount for every named path to bind, and
    those descriptors, for the supervisor to close once the child has its copies."""
    trees: list[int] = []
    entries = []
    try:
        for entry in fs.entries:
            if entry.fd >= 0 and entry.kind in ("ro", "rw"):
                trees.append(syscalls.clone_tree(entry.fd))
                entry = replace(entry, fd=trees[-1], detached=True)
            entries.append(entry)
    except BaseException:
        for tree in trees:
            os.close(tree)
        raise
    return replace(fs, entries=tuple(entries)), trees


def enter(fs: Plan) -> None:
    """Child side: build the root and pivot into it.  Needs CAP_SYS_ADMIN in the mount ns."""
    _mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    sources = {e.source: _source(e) for e in fs.entries if e.kind != "symlink"}
    _mount("tmpfs", STAGE, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV,
           "size=8m,nr_inodes=4096,mode=0755")
    for path in fs.directories:
        _call("mkdir", path, os.mkdir, STAGE + path, 0o755)
        if path == "/tmp" and fs.tmp_bytes:
            # First, so that declared paths below /tmp are shown on top of it.
            _mount("tmpfs", STAGE + "/tmp", "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV,
                   f"size={fs.tmp_bytes},mode=1777")
    for entry in fs.entries:
        if entry.kind == "symlink":
            _call("symlink", entry.target, os.symlink, entry.source, STAGE + entry.target)
        elif entry.kind == "copy":
            _call("copy", entry.target, _copy, sources[entry.source], STAGE + entry.target)
        else:
            _bind(entry, sources[entry.source])
    if fs.proc:
        _mount("proc", STAGE + "/proc", "proc",
               syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
    _mount(None, STAGE, None, syscalls.MS_REMOUNT | syscalls.MS_RDONLY | syscalls.MS_NOSUID
           | syscalls.MS_NODEV)
    _pivot()


def make_empty_root() -> None:
    """The prison's root (compartment.isolate): nothing at all, read-only — no /tmp, no /dev,
    no file to open.  Child side, in a new mount namespace, privileged: made once, by a helper
    the zygote clones at its start and keeps the namespace of; every prison then joins it."""
    _mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    _mount("tmpfs", STAGE, "tmpfs", syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV
           | syscalls.MS_NOEXEC, "size=4k,nr_inodes=1,mode=0555")
    _pivot()


def join_empty_root(mount_namespace: int) -> None:
    """Child side, privileged: enter the empty root's mount namespace.  One syscall instead of
    a mount tree copied, made private, built and pivoted for every call; sharing it is safe
    because it is empty and read-only, and no prison can mount (it has no capability left,
    and the mount family is outside its allow-list).  setns also makes / the working
    directory."""
    try:
        syscalls.setns(mount_namespace, syscalls.CLONE_NEWNS)
    except OSError as err:
        raise fail(STEP, "setns", err, "the empty root's mount namespace") from None


def _bind(entry: Entry, source_fd: int) -> None:
    target = STAGE + entry.target
    if not entry.directory:
        _call("mknod", target, os.mknod, target, 0o600)
    if entry.detached:
        try:
            syscalls.attach_tree(source_fd, target)
        except OSError as err:
            raise fail(STEP, "move_mount", err, target) from None
    else:
        # Bind through the O_PATH descriptor: the path opened in the parent's view is the one
        # shown, even though the staging tmpfs now covers /tmp.
        _mount(f"/proc/self/fd/{source_fd}", target, None, syscalls.MS_BIND)
    os.close(source_fd)
    if entry.remount:
        _mount(None, target, None, entry.remount)


def _copy(source_fd: int, target: str) -> None:
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        while os.sendfile(out, source_fd, None, 1 << 20):
            continue
    finally:
        os.close(out)
        os.close(source_fd)


def _pivot() -> None:
    # pivot_root(".", "."): the old root ends up stacked on the new one and is detached at once,
    # so no path to the host's tree remains (pivot_root(2), "new_root and put_old may be the same").
    _call("chdir", STAGE, os.chdir, STAGE)
    try:
        syscalls.pivot_root(".", ".")
        syscalls.umount2(".", syscalls.MNT_DETACH)
    except OSError as err:
        raise fail(STEP, "pivot_root", err, STAGE) from None
    _call("chdir", "/", os.chdir, "/")


def _source(entry: Entry) -> int:
    """The descriptor to mount or copy from: the supervisor's own for a named path."""
    if entry.fd < 0:
        return _open_path(entry.source, entry.kind == "copy")
    if entry.kind == "copy":  # an O_PATH descriptor cannot be read: open what it names
        return _open_path(f"/proc/self/fd/{entry.fd}", True)
    if entry.detached:
        return entry.fd
    # Unprivileged: the path again, accepted only if it is still what the supervisor decided on.
    found = _open_path(entry.source)
    info = os.fstat(found)
    if (info.st_dev, info.st_ino) != entry.identity:
        raise SetupError(STEP, "open", 0, f"{entry.source} was replaced after the supervisor "
                         "checked it")
    return found


def _open_path(path: str, readable: bool = False) -> int:
    try:
        return os.open(path, (os.O_RDONLY if readable else os.O_PATH) | os.O_CLOEXEC)
    except OSError as err:
        raise fail(STEP, "open", err, path) from None


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    try:
        syscalls.mount(source, target, fstype, flags, data)
    except OSError as err:
        raise fail(STEP, "mount", err, f"{source or ''} {target}".strip()) from None


def _call(call: str, path: str, function: object, *args: object) -> None:
    try:
        function(*args)  # type: ignore[operator]
    except OSError as err:
        raise fail(STEP, call, err, path) from None

"""The spawner: the small process that clones compartments for the resident supervisor.

Privileged (root), single-threaded, started once by `compartment serve` — exec'd fresh, not
forked from the daemon — and importing only the confinement steps and the plan's dataclasses, so
that each clone copies this small process rather than the daemon: a delivery's cost does not grow
with the daemon's size or uptime.

Its one job, in a loop: receive a plan and its descriptors from the daemon (one datagram on a
private socket pair, the descriptors by SCM_RIGHTS), clone the child with CLONE_PARENT, close its
copies of the descriptors, answer the pid.  With CLONE_PARENT the compartment's init is the
daemon's child: the daemon holds its pidfd, reaps it with its rusage, and is the parent whose
death kills it (the init's parent-death signal).  The child takes the same confinement steps, in
the same order, as under `compartment run` (compartment.confine.enter).

The plan travels as marshal data (plain tuples, numbers, strings and bytes: no code, no objects
built by the sender's choice) between two processes of the same root daemon; nothing here reads
what a peer or an agent wrote.
"""

from __future__ import annotations

import dataclasses
import errno
import marshal
import os
import signal
import socket
import struct
import sys

import prctl

from compartment import rootfs, syscalls
from compartment.confine import Plan, namespaces, start

_VERSION = 1
_REPLY = struct.Struct("=ii")  # pid (0 when the clone failed), errno
MAX_PLAN_BYTES = 1 << 20
MAX_FDS = 32
# The spawner's command line: the daemon's module path, so that -S (no site) still finds us.
_BOOT = ("import sys; sys.path[:] = sys.argv[3:]; from compartment.spawner import main; "
         "main()")


class Spawner:
    """The daemon's side: starts the spawner process and talks to it."""

    def __init__(self) -> None:
        import subprocess  # only the daemon's side: the spawner itself never imports it

        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT, str(os.getpid()), str(theirs.fileno()),
             *sys.path], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env={})
        theirs.close()
        self.channel = ours
        self.pending = 0  # plans sent, answers not yet read

    def send(self, plan: Plan, status: int) -> None:
        """Ask for one clone; `status` is the child's end of its status socket."""
        data, fds = encode(plan, status)
        socket.send_fds(self.channel, [data], fds)
        self.pending += 1

    def answer(self) -> tuple[int, int]:
        """(pid, 0) for the oldest plan sent, or (0, errno) if it could not be cloned."""
        data = self.channel.recv(_REPLY.size + 1)
        if len(data) != _REPLY.size:
            raise OSError(errno.EPIPE, "the spawner closed its channel")
        self.pending -= 1
        pid, err = _REPLY.unpack(data)
        return pid, err

    def stop(self) -> None:
        self.channel.close()  # the spawner reads EOF and exits
        self.process.wait()


def encode(plan: Plan, status: int) -> tuple[bytes, list[int]]:
    """The plan as marshal data; its descriptors — the handed ones and those of the named
    paths' mounts — become indexes into the list sent along, the status socket first.  The
    shared network namespace is the spawner's own."""
    fds = [status]

    def index(fd: int) -> int:
        if fd not in fds:
            fds.append(fd)
        return fds.index(fd)

    handed = tuple((target, index(source)) for target, source in plan.handed)
    cgroup = (tuple(map(index, plan.cgroup_procs)),
              index(plan.cgroup_fd) if plan.cgroup_fd >= 0 else -1)
    fs = plan.filesystem
    entries = tuple((*(getattr(entry, name) for name in _ENTRY_FIELDS),
                     index(entry.fd) if entry.fd >= 0 else -1) for entry in fs.entries)
    data = marshal.dumps((_VERSION, plan.unprivileged, plan.hostname, plan.network is not None,
                          plan.uid, plan.gid, (entries, fs.directories, fs.tmp_bytes, fs.proc),
                          plan.last_cap, tuple(map(tuple, plan.rlimits)), plan.seccomp.bpf,
                          handed, plan.program, tuple(plan.argv), dict(plan.env), plan.commit,
                          cgroup))
    return data, fds


_ENTRY_FIELDS = tuple(field.name for field in dataclasses.fields(rootfs.Entry)
                      if field.name != "fd")
_filters: dict[bytes, syscalls.PreparedFilter] = {}


def decode(data: bytes, fds: list[int]) -> Plan:
    (version, unprivileged, hostname, shared_network, uid, gid, fs, last_cap, rlimits, bpf,
     handed, program, argv, env, commit, (cgroup_procs, cgroup_fd)) = marshal.loads(data)
    if version != _VERSION:
        raise ValueError(f"plan version {version}, expected {_VERSION}")
    entries, directories, tmp_bytes, proc = fs
    if bpf not in _filters:  # laid out once per policy's filter, like the supervisor's cache
        _filters[bpf] = syscalls.PreparedFilter(bpf)
    return Plan(unprivileged=unprivileged,
                cgroup_procs=tuple(fds[index] for index in cgroup_procs),
                cgroup_fd=fds[cgroup_fd] if cgroup_fd >= 0 else -1, hostname=hostname,
                network=namespaces.shared_network() if shared_network else None,
                uid=uid, gid=gid,
                filesystem=rootfs.Plan(tuple(_entry(e, fds) for e in entries), directories,
                                       tmp_bytes, proc),
                last_cap=last_cap, rlimits=rlimits, seccomp=_filters[bpf],
                handed=tuple((target, fds[index]) for target, index in handed),
                program=program, argv=argv, env=env, commit=commit)


def _entry(fields: tuple[object, ...], fds: list[int]) -> rootfs.Entry:
    *values, index = fields
    named = dict(zip(_ENTRY_FIELDS, values, strict=True))
    return rootfs.Entry(**named, fd=fds[index] if index >= 0 else -1)  # type: ignore[arg-type]


def main() -> None:
    """The spawner process: `python3 -I -S -c _BOOT DAEMON_PID CHANNEL_FD PATH...`."""
    daemon, channel_fd = int(sys.argv[1]), int(sys.argv[2])
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != daemon:
        os._exit(1)  # the daemon died before the parent-death signal was set
    channel = socket.socket(fileno=channel_fd)
    while True:
        data, fds, _, _ = socket.recv_fds(channel, MAX_PLAN_BYTES, MAX_FDS,
                                          socket.MSG_CMSG_CLOEXEC)
        if not data:
            os._exit(0)  # the daemon closed the channel: nothing more to spawn
        channel.send(_spawn(data, fds))


def _spawn(data: bytes, fds: list[int]) -> bytes:
    try:
        plan = decode(data, fds)
        status = socket.socket(fileno=fds[0])
        try:
            pid = start(plan, status, syscalls.CLONE_PARENT)
        finally:
            status.detach()  # closed below with the others
    except OSError as err:
        return _REPLY.pack(0, err.errno or errno.EIO)
    except (ValueError, TypeError, EOFError, IndexError) as err:
        print(f"compartment spawner: bad plan: {err}", file=sys.stderr)
        return _REPLY.pack(0, errno.EINVAL)
    finally:
        for fd in fds:
            os.close(fd)
    return _REPLY.pack(pid, 0)

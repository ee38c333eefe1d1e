"""Probe agent: runs inside a compartment under /usr/bin/python3 and reports what it can see
and do, as one JSON object on stdout.  The tests decide; the probe only observes.

    probe.py facts                 ids, capabilities, rlimits, no_new_privs, session, fds, env
    probe.py read PATH             try to read a file
    probe.py write PATH            try to create and write a file
    probe.py shmstat ID            look for a System V shared memory segment by id
    probe.py syscall NAME          make one forbidden call (socket, ptrace, unshare, mount...)
    probe.py reserve PATH          fallocate 256 MiB with FALLOC_FL_KEEP_SIZE in PATH (-: stdin)
    probe.py grow BYTES            write BYTES at the end of stdin
    probe.py stdin                 what stdin is: device, access mode, size
"""

import ctypes
import fcntl
import json
import os
import resource
import socket
import sys

libc = ctypes.CDLL(None, use_errno=True)


def capabilities():
    class Header(ctypes.Structure):
        _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))

    class Data(ctypes.Structure):
        _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32))

    header, data = Header(0x20080522, 0), (Data * 2)()
    libc.capget(ctypes.byref(header), data)
    sets = {n: getattr(data[0], n) | getattr(data[1], n) << 32
            for n in ("effective", "permitted", "inheritable")}
    last = 40
    sets["bounding"] = sum(1 << cap for cap in range(last + 1) if libc.prctl(23, cap, 0, 0, 0) == 1)
    sets["ambient"] = sum(1 << cap for cap in range(last + 1)
                          if libc.prctl(47, 1, cap, 0, 0) == 1)
    return sets


def open_fds():
    found = []
    for fd in range(1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.append(fd)
    return found


def facts():
    limits = {name: resource.getrlimit(getattr(resource, name)) for name in
              ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_NPROC",
               "RLIMIT_CORE")}
    return {
        "pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0),
        "uid": os.getresuid(), "gid": os.getresgid(), "groups": os.getgroups(),
        "hostname": socket.gethostname(), "caps": capabilities(),
        "no_new_privs": libc.prctl(39, 0, 0, 0, 0), "seccomp": libc.prctl(21, 0, 0, 0, 0),
        "securebits": libc.prctl(27, 0, 0, 0, 0),
        "rlimits": limits, "fds": open_fds(), "env": dict(os.environ),
        "root": sorted(os.listdir("/")), "cwd": os.getcwd(),
    }


def attempt(function):
    try:
        return {"ok": True, "value": function()}
    except OSError as err:
        return {"ok": False, "errno": err.errno}


def read(path):
    with open(path) as file:
        return file.read(64)


def write(path):
    with open(path, "w") as file:
        file.write("escaped\n")
    return path


def shmstat(segment):
    """shmctl(IPC_STAT) on a segment id: it names a segment only in its own IPC namespace."""
    buffer = ctypes.create_string_buffer(256)
    if libc.shmctl(segment, 2, buffer) < 0:
        raise OSError(ctypes.get_errno(), "shmctl")
    return segment


def reserve(path):
    """Blocks reserved without growing the size, which is all RLIMIT_FSIZE looks at."""
    fd = 0 if path == "-" else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
    failed = libc.fallocate(fd, 1, 0, 256 << 20) != 0  # FALLOC_FL_KEEP_SIZE
    error = ctypes.get_errno() if failed else 0
    info = os.fstat(fd)
    return {"errno": error, "blocks": info.st_blocks, "size": info.st_size}


def grow(count):
    os.lseek(0, 0, os.SEEK_END)
    written = 0
    while written < count:
        written += os.write(0, b"g" * (count - written))
    return written


def stdin():
    info = os.fstat(0)
    return {"dev": info.st_dev, "size": info.st_size,
            "access": fcntl.fcntl(0, fcntl.F_GETFL) & os.O_ACCMODE}


SYSCALLS = {
    "socket-inet": lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).fileno(),
    "socket-unix": lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).fileno(),
    "ptrace": lambda: libc.ptrace(16, 1, 0, 0),  # PTRACE_ATTACH to pid 1
    "unshare": lambda: libc.unshare(0x10000000),  # CLONE_NEWUSER
    "mount": lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
    "keyctl": lambda: libc.syscall(250, 0, 0, 0, 0, 0),  # keyctl(KEYCTL_GET_KEYRING_ID)
    "bpf": lambda: libc.syscall(321, 0, 0, 0),
}


def main():
    what = sys.argv[1]
    if what == "facts":
        result = facts()
    elif what == "read":
        result = attempt(lambda: read(sys.argv[2]))
    elif what == "write":
        result = attempt(lambda: write(sys.argv[2]))
    elif what == "shmstat":
        result = attempt(lambda: shmstat(int(sys.argv[2])))
    elif what == "reserve":
        result = reserve(sys.argv[2])
    elif what == "grow":
        result = attempt(lambda: grow(int(sys.argv[2])))
    elif what == "stdin":
        result = stdin()
    elif what == "syscall":
        result = attempt(SYSCALLS[sys.argv[2]])
    else:
        raise SystemExit(f"probe: unknown request {what}")
    print(json.dumps(result))


main()

"""Functions the isolate tests run in the prison: each tries one thing, most of them forbidden.

A module of its own, imported by name by the zygote (as every isolated function is).  The
forbidden attempts are plain Python calls: what refuses them must be the prison (a seccomp
violation naming the syscall, or the kernel's errno under a relaxed filter), never Python.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import socket
import sys

# Bound at import, in the zygote: inside the prison it is a raw syscall, as an exploit makes it.
_mmap = ctypes.CDLL(None, use_errno=True).mmap
_mmap.restype, _mmap.argtypes = ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                  ctypes.c_int, ctypes.c_int, ctypes.c_long)
SECRET = b"the module's own value"  # the caller changes its copy; the prison must not see it
calls = 0


def echo(data: bytes) -> bytes:
    return data


def count(data: bytes) -> bytes:
    global calls
    calls += 1
    return str(calls).encode()


def secret(data: bytes) -> bytes:
    return SECRET


def environment(data: bytes) -> bytes:
    return json.dumps(dict(os.environ)).encode()


def open_file(data: bytes) -> bytes:
    with open("/etc/passwd", "rb") as file:
        return file.read()


def make_socket(data: bytes) -> bytes:
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    return b"made"


def fork(data: bytes) -> bytes:
    return str(os.fork()).encode()


def execute(data: bytes) -> bytes:
    os.execv("/bin/true", ["true"])
    return b"not reached"


def read_caller_memory(data: bytes) -> bytes:
    """The caller's pid comes in the input; /proc is not there, and open is refused anyway."""
    with open(f"/proc/{int(data)}/mem", "rb") as memory:
        return memory.read(16)


def read_descriptor(data: bytes) -> bytes:
    return os.read(3, 100)  # the lowest number above the prison's own three


def write_through_mapping(data: bytes) -> bytes:
    """A shared writable mapping of descriptor 0, which the caller opened read-write."""
    address = _mmap(None, 4096, 0x1 | 0x2, 0x01, 0, 0)  # PROT_READ|WRITE, MAP_SHARED
    ctypes.memmove(address, b"overwritten", 11)
    return b"wrote"


def map_executable(data: bytes) -> bytes:
    """Executable memory, which shellcode would need."""
    _mmap(None, 4096, 0x1 | 0x4, 0x02 | 0x20, -1, 0)  # PROT_READ|EXEC, MAP_PRIVATE|ANONYMOUS
    return b"mapped"


def kill_self(data: bytes) -> bytes:
    os.kill(os.getpid(), 9)
    return b"alive"


def loop(data: bytes) -> bytes:
    while True:
        pass


def allocate(data: bytes) -> bytes:
    hoard = []
    while True:
        hoard.append(bytearray(1 << 20))


def recurse(data: bytes) -> bytes:
    return recurse(data)


def raise_value_error(data: bytes) -> bytes:
    raise ValueError("bad header: X-Evil\nsecond line, never shown")


def return_text(data: bytes) -> bytes:
    return "not bytes"  # type: ignore[return-value]


def double(data: bytes) -> bytes:
    return data * 2


def half_written(data: bytes) -> bytes:
    """Writes part of an output itself, then ends before the prison's code says it is done."""
    os.write(1, data[: len(data) // 2])
    os._exit(0)


def output_without_record(data: bytes) -> bytes:
    """Writes output beside the one it returns: the record will not match what arrived."""
    os.write(1, b"extra")
    return data


def printing(data: bytes) -> bytes:
    print("debugging output", file=sys.stdout, flush=True)
    print("more", file=sys.stderr, flush=True)
    return data


# Under a relaxed filter (seccomp.allow adds the calls), the walls behind seccomp.
def open_descriptors(data: bytes) -> bytes:
    """Which descriptors are open, by fcntl(F_GETFD) on each number below 1024."""
    found = []
    for fd in range(1024):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as err:
            assert err.errno == errno.EBADF
            continue
        found.append(fd)
    return json.dumps(found).encode()


def facts(data: bytes) -> bytes:
    """The root, ids and limits, with stat, mkdir, dup, getresuid... allowed."""
    def attempt(call: object) -> str:
        try:
            call()  # type: ignore[operator]
        except OSError as err:
            return errno.errorcode[err.errno]
        return "ok"
    return json.dumps({
        "root_links": os.stat("/").st_nlink,  # 2: a directory with nothing in it
        "stat_etc": attempt(lambda: os.stat("/etc")),
        "open_dot": attempt(lambda: os.open("/", os.O_RDONLY)),
        "mkdir": attempt(lambda: os.mkdir("/x")),
        "dup": attempt(lambda: os.dup(0)),
        "uid": os.getresuid(), "gid": os.getresgid(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
        "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
        "pid": os.getpid(),
    }).encode()


def lazy_import(data: bytes) -> bytes:
    """An import the zygote has not done: the import system looks for the file."""
    import colorsys  # noqa: F401 - imported by nothing else, so not in the zygote
    return b"imported"

"""The zygote of compartment.isolate: a clean process per isolated function, cloning a prison
for each call.

Started by the caller (compartment/isolate.py) with `python3 -I`, the policy's environment and
its connection at descriptor 3: not a fork of the caller, so none of its threads, sockets, keys,
open files or memory.  Trusted and unconfined (root when the caller is root), single-threaded,
as clone() requires.  Its life:
  start  close every other descriptor it inherited; read its configuration (one record);
         import the function's module by name and resolve the function by qualified name
         (nothing else of the caller's); move into network, ipc and uts namespaces of its own
         (and a user namespace, unprivileged); make the empty root; say ready.
  serve  per call: take the input and output descriptors (SCM_RIGHTS), lease a uid (root),
         clone the prison (compartment.confine.enter_prison), watch it (compartment.watch:
         its exit, a setup failure, a seccomp violation, the output spliced into the caller's
         memfd, the deadline), classify, and reply with one fixed-size record.
  end    when the caller's end of the connection closes.
The zygote never reads the input; of the output it only counts bytes.  The one thing of the
prison's making it reads is the result record: fixed-size, checked, and only its two text
fields (an exception's type name and first line) go on to the caller, as text.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import socket
import struct
import sys
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from compartment import syscalls, uidpool
from compartment.api import killed_reason, signalled
from compartment.confine import (
    CHILD_FAILED,
    PRISON_HELD,
    PRISON_INPUT,
    PRISON_OUTPUT,
    PRISON_RECORD,
    PRISON_ROOT,
    PRISON_STATUS,
    PrisonPlan,
    capabilities,
    enter_prison,
    filesystem,
    namespaces,
    rlimits,
)
from compartment.confine.descriptors import INPUT_TAG
from compartment.confine.errors import RECORD as SETUP_RECORD
from compartment.confine.errors import SetupError
from compartment.exits import Outcome
from compartment.isolate import HELLO, REPLY, REQUEST, ZYGOTE_FD
from compartment.policy import Limits
from compartment.syscall_filter import CompiledFilter
from compartment.watch import Watch

# What the function's process says about its end, on descriptor 2, once: b"return" and the
# length of the output it wrote, or b"raise", the exception type's name and its first line.
RESULT = struct.Struct("=8sQ64s176s")
RAISED = 1  # the function's process exits 0 after b"return", RAISED after b"raise"
_MEMORY_RECORD = RESULT.pack(b"raise", 0, b"MemoryError", b"")  # made now: no memory later
_CONFIG_BYTES = 1 << 20


@dataclass
class Prison:
    """What every call's prison shares, prepared once."""

    func: Any
    limits: Limits
    watch_limits: Limits  # the same, with room for the result record beside the output
    unprivileged: bool
    identity: tuple[str | int, str | int, tuple[int, int]]
    root: int  # the empty root's mount namespace
    plan: PrisonPlan
    names: dict[int, str]
    # What a Watch made ahead of the request is given as the caller's stdout and stderr: two
    # writable files, not the same one, so that it makes the two pipes; the output's real
    # destination comes with the request (Watch.commit), and nothing is ever written to these.
    stand_ins: tuple[int, int]


def main() -> NoReturn:
    """The zygote's process, from `python3 -I -c`; exits when the caller closes its end."""
    os.closerange(ZYGOTE_FD + 1, 0x7FFFFFFF)  # whatever else the caller left inheritable
    os.chdir("/")
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, ZYGOTE_FD)
    try:
        prison = _prepare(json.loads(connection.recv(_CONFIG_BYTES)))
    except (ImportError, ValueError, SetupError) as err:  # ours: each says what and where
        _refuse(connection, str(err))
    except Exception as err:  # noqa: BLE001 - told to the caller, who raises it at isolate()
        _refuse(connection, f"zygote: {_line(err)}")
    # What the zygote holds from now on is never collected: a collection would write to every
    # object's header, and so copy every page shared with a prison (gc.freeze's own purpose).
    gc.freeze()
    connection.send(HELLO.pack(b"ready", b""))
    _serve(connection, prison)
    os._exit(0)


def _refuse(connection: socket.socket, reason: str) -> NoReturn:
    connection.send(HELLO.pack(b"error", reason.encode(errors="replace")[:256]))
    os._exit(1)


def _prepare(config: dict[str, Any]) -> Prison:
    func = _resolve(config["module"], config["qualname"], config["file"])
    limits = Limits(**config["limits"])
    unprivileged = os.geteuid() != 0
    _check_memory(limits.memory_bytes)
    namespaces.zygote(unprivileged, f"compartment-{os.urandom(4).hex()}.invalid")
    last_cap = syscalls.cap_last_cap()
    capabilities.restrict(last_cap)  # inherited by every prison: see confine.enter_prison
    root = _empty_root()
    compiled = CompiledFilter(bytes.fromhex(config["bpf"]),
                              {int(nr): name for nr, name in config["names"].items()})
    uid, gid, pool = config["identity"]
    plan = PrisonPlan(unprivileged=unprivileged, uid=-1, gid=-1, last_cap=last_cap,
                      rlimits=rlimits.prison(limits, PRISON_HELD), seccomp=compiled.prepared,
                      handed=())
    watch_limits = replace(limits, output_bytes=limits.output_bytes + RESULT.size)
    stand_ins = (os.memfd_create("output-stand-in", os.MFD_CLOEXEC),
                 os.memfd_create("record-stand-in", os.MFD_CLOEXEC))
    return Prison(func, limits, watch_limits, unprivileged, (uid, gid, tuple(pool)), root, plan,
                  compiled.names, stand_ins)


def _resolve(module: str, qualname: str, file: str | None) -> Any:
    """The function, from its module imported by name: the one import of the caller's code."""
    try:
        found: Any = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any failure of the module's code is the answer
        raise ImportError(f"the zygote cannot import {module}: {_line(err)}") from None
    if file and getattr(found, "__file__", None) != file:
        raise ImportError(f"the zygote imported {module} from {found.__file__}, not from "
                          f"{file} as the caller did")
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not callable(found):
        raise ImportError(f"{module}:{qualname} is not a function the zygote can call")
    return found


def _check_memory(memory_bytes: int) -> None:
    """The prison starts as a copy of the zygote: its limit must leave room to work."""
    with open("/proc/self/status") as status:
        vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    if memory_bytes < (vm_kib << 10) + (16 << 20):
        raise ValueError(f"limits.memory_bytes ({memory_bytes}) leaves the function less than "
                         f"16 MiB beyond the zygote's own address space ({vm_kib << 10} bytes)")


def _empty_root() -> int:
    """A descriptor of the empty root's mount namespace, made once by a helper child (the
    zygote itself keeps the host's view, where the uid pool lives)."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    pid = syscalls.clone(syscalls.CLONE_NEWNS)
    if pid == 0:
        try:
            os.close(report_r)
            os.close(hold_w)  # so that the zygote's close is the end of the pipe
            filesystem.make_empty_root()
            os.write(report_w, b"ok")
            os.read(hold_r, 1)  # until the zygote has opened the namespace
        except SetupError as err:
            os.write(report_w, err.pack())
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(hold_r)
    try:
        said = os.read(report_r, SETUP_RECORD.size)
        if said != b"ok":
            raise SetupError.unpack(said) if len(said) == SETUP_RECORD.size else \
                SetupError("filesystem", "clone", 0, "the empty root's helper said nothing")
        return os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(report_r)
        os.close(hold_w)
        os.waitpid(pid, 0)


@dataclass
class Ready:
    """A prison cloned ahead of its request, confined but for its input and seccomp."""

    watch: Watch
    lease: uidpool.Lease | None
    discarded: bool = False

    def discard(self) -> None:
        if self.discarded:
            return
        self.discarded = True
        self.watch.close()  # kills it if it is still there, and reaps it
        if self.lease:
            self.lease.release()  # after close(): the prison has been reaped


def _serve(connection: socket.socket, prison: Prison) -> None:
    """Calls in order.  Each prison is cloned ahead of its request, once the call before has
    been answered: its setup overlaps the caller's turn.  (Cloning it while the call before
    runs would overlap more, but costs more: every page the zygote writes while two copies of
    it live is copied.)"""
    ready = _try_ahead(prison)
    while True:
        data, fds, _, _ = socket.recv_fds(connection, REQUEST.size + 1, 2,
                                          socket.MSG_CMSG_CLOEXEC)
        if not data:
            if ready:
                ready.discard()
            return  # the caller closed its end: this zygote's work is over
        try:
            reply = _answer(data, fds, prison, ready)
        finally:
            for fd in fds:
                os.close(fd)
        connection.send(reply, socket.MSG_NOSIGNAL)
        ready = _try_ahead(prison)


def _try_ahead(prison: Prison) -> Ready | None:
    """A prison ahead, or None when one cannot be made now (the next request tries again,
    and answers with the reason if it fails then too)."""
    try:
        return _ahead(prison)
    except Exception:  # noqa: BLE001 - reported by the request that needs it
        return None


def _ahead(prison: Prison) -> Ready:
    """Lease a uid, make the prison's pipes and clone it: it confines itself and waits."""
    uid, gid, lease = _identity(prison)
    ready: Ready | None = None
    status = theirs = None
    try:
        ready = Ready(Watch(prison.watch_limits, (-1, *prison.stand_ins), prison.names), lease)
        status, theirs = socket.socketpair(socket.AF_UNIX,
                                           socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        ends = dict(ready.watch.agent_ends())
        handed = ((PRISON_INPUT, 0), (PRISON_OUTPUT, ends[1]), (PRISON_RECORD, ends[2]),
                  (PRISON_STATUS, theirs.fileno()), (PRISON_ROOT, prison.root))
        plan = prison.plan
        pid = _clone(PrisonPlan(plan.unprivileged, uid, gid, plan.last_cap, plan.rlimits,
                                plan.seccomp, handed), prison.func)
        ready.watch.start(pid, status)  # the watch owns the status socket from here
    except BaseException:
        if status is not None:
            status.close()
        if ready:
            ready.discard()
        elif lease:
            lease.release()
        raise
    finally:
        if theirs is not None:
            theirs.close()
    return ready


def _answer(data: bytes, fds: list[int], prison: Prison, ready: Ready | None) -> bytes:
    sequence = 0
    try:
        tag, sequence = REQUEST.unpack(data)
        if tag.rstrip(b"\0") != b"call" or len(fds) != 2:
            raise ValueError(f"a request of {len(data)} bytes with {len(fds)} descriptors")
        ready = ready or _ahead(prison)
        outcome, reason, size = _call(prison, ready, fds[0], fds[1])
    except uidpool.PoolExhausted as err:  # as for run: the configuration is short of uids
        return _failed(sequence, Outcome.CONFIG_ERROR, str(err))
    except Exception as err:  # noqa: BLE001 - the zygote's one catch-all: reported, it goes on
        if ready:
            ready.discard()
        return _failed(sequence, Outcome.INTERNAL_ERROR, f"zygote: {_line(err)}")
    watch = ready.watch
    usage = watch.rusage
    cpu_s = usage.ru_utime + usage.ru_stime if usage else 0.0
    return REPLY.pack(b"reply", sequence, str(outcome).encode(), size, cpu_s,
                      watch.ended - watch.started, (watch.denied_syscall or "").encode()[:32],
                      reason.encode(errors="replace")[:256])


def _failed(sequence: int, outcome: Outcome, reason: str) -> bytes:
    return REPLY.pack(b"reply", sequence, str(outcome).encode(), 0, 0.0, 0.0, b"",
                      reason.encode(errors="replace")[:256])


def _call(prison: Prison, ready: Ready, input_fd: int,
          output_fd: int) -> tuple[Outcome, str, int]:
    """Hand the prepared prison its input and watch it to its end."""
    watch = ready.watch
    try:
        watch.commit(output_fd)
        with contextlib.suppress(OSError):  # it died before its request: the watch tells how
            socket.send_fds(watch.status, [INPUT_TAG], [input_fd], socket.MSG_NOSIGNAL)
        watch.run()
    finally:
        ready.discard()
    size = os.fstat(output_fd).st_size
    return (*_classify(watch, size, prison.limits), size)


def _identity(prison: Prison) -> tuple[int, int, uidpool.Lease | None]:
    if prison.unprivileged:
        return os.getuid(), os.getgid(), None  # the caller's own, mapped in our namespace
    uid, gid, pool = prison.identity
    if uid == "pool":
        lease = uidpool.lease(*pool)
        return lease.uid, lease.uid, lease
    return int(uid), int(gid), None


def _clone(plan: PrisonPlan, func: Any) -> int:
    """Clone the prison: returns its pid; the child never returns from here."""
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collection in the child: a finaliser of ours must not run in the prison
    try:
        pid = syscalls.clone(namespaces.PRISON_CLONE_FLAGS)
        if pid == 0:
            try:
                enter_prison(plan)
                _run(func)
            finally:
                os._exit(CHILD_FAILED)
    finally:
        if gc_was_enabled:
            gc.enable()
    return pid


def _run(func: Any) -> NoReturn:
    """The function's process, confined: read the input, call, write the output and the
    result record, exit.  print() goes nowhere rather than into the output."""
    sys.stdout = sys.stderr = None
    try:
        result = func(_read_input())
        if not isinstance(result, bytes | bytearray):
            raise TypeError(f"the function returned {type(result).__name__}, not bytes")
        _write_all(PRISON_OUTPUT, result)
        record, code = RESULT.pack(b"return", len(result), b"", b""), 0
    except BaseException as err:  # noqa: BLE001 - every exception is the call's outcome
        record, code = _raised(err), RAISED
    _write_all(PRISON_RECORD, record)
    os._exit(code)


def _read_input() -> bytes:
    chunks = []
    while chunk := os.read(PRISON_INPUT, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _raised(err: BaseException) -> bytes:
    try:
        first = str(err).partition("\n")[0][:176]
        return RESULT.pack(b"raise", 0, type(err).__name__.encode()[:64],
                           first.encode(errors="backslashreplace")[:176])
    except BaseException:  # noqa: BLE001 - str() of a hostile exception may fail too
        return _MEMORY_RECORD if isinstance(err, MemoryError) else \
            RESULT.pack(b"raise", 0, type(err).__name__.encode()[:64], b"")


def _classify(watch: Watch, size: int, limits: Limits) -> tuple[Outcome, str]:
    """The call's outcome and its reason, from what the watch saw and the result record."""
    if watch.setup_error:
        internal = watch.setup_error.step == "internal"
        return (Outcome.INTERNAL_ERROR if internal else Outcome.CONFIG_ERROR,
                f"cannot build the prison: {watch.setup_error.text()}")
    if watch.killed_for:
        return watch.killed_for, killed_reason(watch, limits)
    status = watch.wait_status
    usage = watch.rusage
    if os.WIFSIGNALED(status):
        cpu_s = usage.ru_utime + usage.ru_stime if usage else 0.0
        return signalled(os.WTERMSIG(status), cpu_s, limits)
    code = os.WEXITSTATUS(status)
    agent_record = bytes(watch.diagnostics)
    if len(agent_record) != RESULT.size:
        return (Outcome.AGENT_FAILED, f"the function's process exited with status {code} "
                f"without its result ({len(agent_record)} bytes of record)")
    tag, length, name, line = RESULT.unpack(agent_record)
    if tag.rstrip(b"\0") == b"return" and code == 0 and length == size <= limits.output_bytes:
        return Outcome.OK, f"returned {size} bytes"
    if size > limits.output_bytes:  # within the record's room, which was not its to use
        return Outcome.OUTPUT_LIMIT, f"wrote more than {limits.output_bytes} bytes of output"
    if tag.rstrip(b"\0") == b"raise" and code == RAISED:
        kind, first = _printable(name), _printable(line)
        said = f"{kind}: {first}" if first else kind
        if kind == "MemoryError":  # the function's claim: a memory-limit, still temporary
            return Outcome.MEMORY_LIMIT, f"{said} (limits.memory_bytes is {limits.memory_bytes})"
        return Outcome.AGENT_FAILED, said
    return (Outcome.AGENT_FAILED, f"the function's process exited with status {code} and a "
            f"result record that does not match its output ({size} bytes)")


def _printable(agent_field: bytes) -> str:
    """A text field of the prison's record, as one line of printable characters."""
    text = agent_field.rstrip(b"\0").decode(errors="replace")
    return "".join(c if c.isprintable() else "?" for c in text)


def _line(err: BaseException) -> str:
    """`TypeName: first line of the message`, for a reply."""
    said = str(err).partition("\n")[0]
    return f"{type(err).__name__}: {said}"[:240] if said else type(err).__name__

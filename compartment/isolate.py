"""compartment.isolate: a Python function in DJB's prison, one child per call, without exec.

    from compartment import Failed, isolate

    with isolate(mailfilters.strip_attachments, memory_bytes="128M") as strip:
        try:
            new_message = strip(message)          # bytes, or a readable descriptor
        except Failed as failed:
            print(failed.outcome, failed.reason)  # e.g. violation, "seccomp violation: ..."

Caller side: the API object, its life cycle and the call protocol.  The function is named by
reference (module and qualified name) to a zygote, compartment/zygote.py, started once per
isolated function with `python3 -I` and the policy's environment: it imports that module,
nothing else of the caller's, and clones a prison for each call.  A call sends the zygote two
descriptors — the input (a sealed memfd of the bytes, or the caller's own descriptor) and an
empty memfd for the output — and takes back one fixed-size reply; the output is read from the
memfd, bounded by limits.output_bytes.  Nothing is pickled either way, and nothing the prison
made is evaluated, imported or unpickled here.

Threads: one connection to the zygote per isolated function, one call at a time on it, under a
lock.  The zygote is single-threaded and serves calls in order (its children do the work, a
call of a small function costs about a millisecond), so a connection per call would buy only
a queue in the zygote; a caller that wants calls in parallel makes one isolate() per worker.
A forked caller (os.fork) gets a zygote of its own at its first call; the parent's is left to
the parent.  asyncio: `await f.acall(data)` runs the call in the loop's default executor.
"""

from __future__ import annotations

import _thread
import dataclasses
import json
import os
import select
import signal
import socket
import struct
import sys
import weakref
from typing import TYPE_CHECKING, Any

from compartment import message, syscalls
from compartment.api import signal_name
from compartment.exits import Failed, Outcome
from compartment.policy import Policy, PolicyError
from compartment.policy_fields import Bad

if TYPE_CHECKING:
    from collections.abc import Callable

# The protocol: fixed-size records on a SOCK_SEQPACKET pair, one message each.
HELLO = struct.Struct("=8s256s")  # b"ready" or b"error", and why
REQUEST = struct.Struct("=8sQ")  # b"call", sequence number; SCM_RIGHTS: input, output
# b"reply", sequence number, outcome, output bytes, CPU and wall seconds, denied syscall, reason
REPLY = struct.Struct("=8sQ16sQdd32s256s")
ZYGOTE_FD = 3  # the zygote's end of the connection, in the zygote

LIMITS = ("wall_timeout_s", "cpu_seconds", "memory_bytes", "output_bytes")
START_TIMEOUT_S = 60.0  # importing the function's module may be slow, once
ANSWER_MARGIN_S = 2.0  # the zygote kills at the deadline; past this margin it is stuck
_BOOT = "import sys; sys.path[:] = sys.argv[1:]; from compartment.zygote import main; main()"
_LIVE: weakref.WeakSet[Isolated] = weakref.WeakSet()


def isolate(func: Callable[[bytes], bytes] | str, policy: str | Policy = "strict",
            **limits: Any) -> Isolated:
    """`func(data: bytes) -> bytes`, run in a prison per call.  `func` is a function defined at
    a module's top level, or "module:qualname"; `policy` a shipped policy name, a path or a
    Policy, whose [limits], [identity] and seccomp allow/deny apply; `limits` override
    wall_timeout_s, cpu_seconds, memory_bytes and output_bytes (units as in the policy)."""
    return Isolated(_reference(func), _policy(policy, limits))


class Isolated:
    """The isolated function: call it with bytes or a readable descriptor, get bytes back or
    compartment.Failed.  `deaths` lists every zygote death seen, one line each (they are also
    logged on the "compartment.isolate" logger); a dead zygote is replaced at the next call."""

    def __init__(self, reference: tuple[str, str, str | None], policy: Policy) -> None:
        self.reference = f"{reference[0]}:{reference[1]}"
        self.policy = policy
        self.deaths: list[str] = []
        self._config = _config(reference, policy)
        self._env = dict(policy.environment.set)
        self._lock = _thread.allocate_lock()
        self._closed = False
        self._zygote: _Zygote | None = _Zygote.start(self._config, self._env)
        _LIVE.add(self)

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.pid if self._zygote else None

    def __call__(self, data: bytes | bytearray | memoryview | int | Any) -> bytes:
        input_fd, owned = _input(data)
        output_fd = os.memfd_create("isolate-output", os.MFD_CLOEXEC)
        try:
            with self._lock:
                reply = self._exchange(input_fd, output_fd)
            return _output(reply, output_fd, self.policy.limits.output_bytes)
        finally:
            os.close(output_fd)
            if owned:
                os.close(input_fd)

    async def acall(self, data: bytes | bytearray | memoryview | int | Any) -> bytes:
        """The call for asyncio code: run in the loop's default executor, so the loop goes on
        meanwhile.  A cancelled await leaves the call to finish (by its deadline at most)."""
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self, data)

    def close(self) -> None:
        """Stop the zygote: it exits when its connection closes; waited for, killed if stuck."""
        with self._lock:
            self._closed = True
            zygote, self._zygote = self._zygote, None
            if zygote:
                zygote.stop()

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        zygote = getattr(self, "_zygote", None)
        if zygote:
            zygote.abandon()  # its connection closes, so it exits; close() would also reap it

    def _exchange(self, input_fd: int, output_fd: int) -> tuple[Any, ...]:
        if self._closed:
            raise ValueError(f"isolated function {self.reference} is closed")
        zygote = self._zygote
        if zygote is None or not zygote.alive():
            if zygote is not None:
                self._died(zygote, "between calls", zygote.reap())
            zygote = self._zygote = _Zygote.start(self._config, self._env)
        timeout_s = self.policy.limits.wall_timeout_s + ANSWER_MARGIN_S
        try:
            return zygote.call(input_fd, output_fd, timeout_s)
        except _Stuck:
            zygote.kill()
            how = f"did not answer within {timeout_s:g} s, and was killed"
        except _Gone:
            how = zygote.reap()
        self._zygote = None
        line = self._died(zygote, "during a call", how)
        raise Failed(Outcome.INTERNAL_ERROR, f"{line}; the next call starts a new one")

    def _died(self, zygote: _Zygote, when: str, how: str) -> str:
        import logging  # only when it happens

        line = f"the zygote of {self.reference} (pid {zygote.pid}) {how}, {when}"
        self.deaths.append(line)
        logging.getLogger("compartment.isolate").warning("%s", line)
        return line

    def _after_fork(self) -> None:
        """In a forked child: the zygote and the lock are the parent's."""
        self._lock = _thread.allocate_lock()
        if self._zygote:
            self._zygote.abandon()
            self._zygote = None


class _Gone(Exception):
    """The zygote's connection ended: it died."""


class _Stuck(Exception):
    """The zygote did not answer in time."""


class _Zygote:
    """Our end of one zygote: its pid, a pidfd and the connection."""

    def __init__(self, pid: int, connection: socket.socket) -> None:
        self.pid, self.connection = pid, connection
        self.pidfd = os.pidfd_open(pid)
        self.sequence = 0
        self.ended = ""  # how it ended, once reaped

    @classmethod
    def start(cls, config: dict[str, Any], env: dict[str, str]) -> _Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            pid = os.posix_spawn(sys.executable, [sys.executable, "-I", "-c", _BOOT, *_path()],
                                 env, file_actions=_file_actions(theirs.fileno()), setsid=True,
                                 setsigmask=(), setsigdef=_CATCHABLE)
        except OSError as err:
            ours.close()
            raise Failed(Outcome.CONFIG_ERROR, f"cannot start the zygote ({sys.executable}): "
                         f"{err.strerror}") from None
        finally:
            theirs.close()
        zygote = cls(pid, ours)
        try:
            ours.send(json.dumps(config).encode())  # one record: the zygote's configuration
            zygote.hello()
        except BaseException:
            zygote.kill()
            raise
        return zygote

    def hello(self) -> None:
        try:
            data = self._answer(HELLO.size, START_TIMEOUT_S, "start")
        except _Stuck:
            raise Failed(Outcome.CONFIG_ERROR, f"the zygote was not ready within "
                         f"{START_TIMEOUT_S:g} s (importing the module?)") from None
        except _Gone:
            raise Failed(Outcome.CONFIG_ERROR, f"the zygote {self.reap()} before it was ready "
                         "(its error is on stderr)") from None
        tag, reason = HELLO.unpack(data)
        if tag.rstrip(b"\0") != b"ready":
            raise Failed(Outcome.CONFIG_ERROR, _text(reason))

    def call(self, input_fd: int, output_fd: int, timeout_s: float) -> tuple[Any, ...]:
        self.sequence += 1
        try:
            socket.send_fds(self.connection, [REQUEST.pack(b"call", self.sequence)],
                            [input_fd, output_fd], socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError):
            raise _Gone from None
        fields = REPLY.unpack(self._answer(REPLY.size, timeout_s, "call"))
        if fields[0].rstrip(b"\0") != b"reply" or fields[1] != self.sequence:
            raise Failed(Outcome.INTERNAL_ERROR, f"the zygote answered call {self.sequence} "
                         f"with {fields[:2]!r}")
        return fields

    def _answer(self, size: int, timeout_s: float, what: str) -> bytes:
        """One record of `size` bytes, or _Gone / _Stuck."""
        if not _ready(self.connection.fileno(), timeout_s):
            raise _Stuck
        data = self.connection.recv(size + 1)
        if not data:
            raise _Gone
        if len(data) != size:
            raise Failed(Outcome.INTERNAL_ERROR, f"the zygote's {what} record has {len(data)} "
                         f"bytes, not {size}")
        return data

    def alive(self) -> bool:
        return not _ready(self.pidfd, 0)  # a pidfd is readable once the process has ended

    def stop(self) -> None:
        """Close the connection, which ends the zygote, and reap it."""
        self.connection.close()
        self.reap()

    def kill(self) -> None:
        self._signal_kill()
        self.reap()

    def reap(self) -> str:
        """Wait for its end (killing it if it lingers past the margin); how it ended."""
        if not self.ended:
            self.connection.close()
            if not _ready(self.pidfd, ANSWER_MARGIN_S):
                self._signal_kill()
                _ready(self.pidfd, None)
            os.close(self.pidfd)
            self.ended = _how_it_ended(self.pid)
        return self.ended

    def _signal_kill(self) -> None:
        if self.ended:
            return
        try:
            syscalls.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return  # it has ended by itself: the reaping tells how

    def abandon(self) -> None:
        """Close our end without waiting: the zygote exits (and stays a zombie until this
        process ends).  In a forked child: close our copies; the zygote is the parent's."""
        self.connection.close()
        os.close(self.pidfd)


_CATCHABLE = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}


def _how_it_ended(pid: int) -> str:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "ended (reaped elsewhere: status unknown)"
    if os.WIFSIGNALED(status):
        return f"was killed by {signal_name(os.WTERMSIG(status))}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _ready(fd: int, timeout_s: float | None) -> bool:
    poller = select.poll()  # not select(): a busy caller's descriptors may be above 1023
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout_s is None else timeout_s * 1000))


def _file_actions(connection_fd: int) -> list[tuple[Any, ...]]:
    # The connection first, to its fixed number (dup2 clears close-on-exec there), in case it
    # is 0 or 1; then /dev/null as stdin and stdout.  stderr is the caller's, where Python
    # prints a traceback should the zygote's own code fail.  Other descriptors the caller left
    # inheritable are closed by the zygote as it starts.
    return [(os.POSIX_SPAWN_DUP2, connection_fd, ZYGOTE_FD),
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)]


def _path() -> list[str]:
    """The caller's module search path, so that the zygote finds the module where the caller
    did (`python3 -I` starts with none of the caller's additions)."""
    return [os.path.abspath(entry or os.curdir) for entry in sys.path]


def _reference(func: Callable[[bytes], bytes] | str) -> tuple[str, str, str | None]:
    """(module, qualified name, the module's file): how the zygote finds the function."""
    if isinstance(func, str):
        module, _, qualname = func.partition(":")
        if not module or not qualname:
            raise TypeError(f"isolate(): {func!r}: expected MODULE:FUNCTION")
        return module, qualname, None
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    if not callable(func) or not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(f"isolate(): {func!r} is not a function defined in a module; give a "
                        "module-level function or 'module:function'")
    if "<" in qualname:  # <lambda>, <locals>
        raise TypeError(f"isolate(): {module}.{qualname} is a lambda, closure or nested "
                        "function; the zygote imports the function by name, so define it at "
                        "the top level of a module")
    home = sys.modules.get(module)
    found: Any = home
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not func:
        raise TypeError(f"isolate(): {module}.{qualname} does not name {func!r} (a bound "
                        "method, or a copy made by a decorator?)")
    if module == "__main__":
        spec = getattr(home, "__spec__", None)
        if spec is None:
            raise TypeError(f"isolate(): {qualname} is defined in the script being run "
                            "(__main__), which the zygote cannot import by name; move it into "
                            "a module")
        module = spec.name  # run with -m: the zygote imports it by its own name
    return module, qualname, getattr(home, "__file__", None)


def _policy(policy: str | Policy, limits: dict[str, Any]) -> Policy:
    loaded = policy if isinstance(policy, Policy) else Policy.load(policy)
    fields = {spec.name: spec for spec in dataclasses.fields(loaded.limits)}
    values = {}
    for key, value in limits.items():
        if key not in LIMITS:
            raise TypeError(f"isolate() got an unexpected keyword argument {key!r} (limits: "
                            f"{', '.join(LIMITS)})")
        try:
            values[key] = fields[key].metadata["parse"](value)
        except Bad as bad:
            raise PolicyError(f"isolate(): {key}: expected {bad}, got {value!r}") from None
    loaded = dataclasses.replace(loaded, limits=dataclasses.replace(loaded.limits, **values))
    _check_prison(loaded)
    return loaded


def _check_prison(policy: Policy) -> None:
    """A policy that promises what the prison does not give is refused, not half-applied."""
    fs = policy.filesystem
    wrong = [(fs.root != "empty", 'filesystem.root = "empty"'),
             (bool(fs.readable or fs.writable or fs.devices or fs.proc or fs.tmp_bytes),
              "nothing in filesystem.readable, writable, devices, proc or tmp_bytes"),
             (policy.seccomp.default != "kill", 'seccomp.default = "kill"'),
             (bool(policy.descriptors.pass_), "no descriptors.pass"),
             (policy.identity.uid == "owner", 'identity.uid "pool" or a number'),
             # a prison has no cgroup of its own yet: its limits are rlimits
             (policy.limits.enforcement == "cgroup", 'limits.enforcement "auto" or "rlimits"')]
    for bad, wanted in wrong:
        if bad:
            raise PolicyError(f"{policy.source}: isolate() runs the function in the prison "
                              f"(an empty root, an allow-list, its three descriptors) and needs "
                              f"{wanted}; start from the strict policy")


def _config(reference: tuple[str, str, str | None], policy: Policy) -> dict[str, Any]:
    from compartment.syscall_filter import FilterError, compile_prison

    try:
        compiled = compile_prison(policy.seccomp.allow, policy.seccomp.deny)
    except FilterError as err:
        raise PolicyError(f"{policy.source}: {err}") from None
    ident = policy.identity
    return {"module": reference[0], "qualname": reference[1], "file": reference[2],
            "limits": {key: getattr(policy.limits, key) for key in LIMITS},
            "identity": [ident.uid, ident.gid, list(ident.uid_pool)],
            "bpf": compiled.bpf.hex(), "names": compiled.names}


def _input(data: Any) -> tuple[int, bool]:
    """(descriptor, ours to close): a sealed memfd of bytes, or the caller's descriptor."""
    if isinstance(data, bytes | bytearray | memoryview):
        return message.sealed(data), True
    if isinstance(data, int) or hasattr(data, "fileno"):
        return (data if isinstance(data, int) else data.fileno()), False
    raise TypeError(f"an isolated function takes bytes or a readable descriptor, not "
                    f"{type(data).__name__}")


def _output(reply: tuple[Any, ...], output_fd: int, output_bytes: int) -> bytes:
    _, _, outcome, bytes_out, _, _, denied, reason = reply
    try:
        result = Outcome(_text(outcome))
    except ValueError:
        raise Failed(Outcome.INTERNAL_ERROR, f"the zygote replied with an unknown outcome "
                     f"{_text(outcome)!r}") from None
    if result is not Outcome.OK:
        raise Failed(result, _text(reason), _text(denied) or None)
    size = os.fstat(output_fd).st_size
    if size != bytes_out or size > output_bytes:
        raise Failed(Outcome.INTERNAL_ERROR, f"the output holds {size} bytes; the zygote counted "
                     f"{bytes_out}, the limit is {output_bytes}")
    return _read_all(output_fd, size)


def _read_all(fd: int, size: int) -> bytes:
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            raise Failed(Outcome.INTERNAL_ERROR, f"the output ended at {offset} of {size} bytes")
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _text(field: bytes) -> str:
    return field.rstrip(b"\0").decode(errors="replace")


def _forked() -> None:
    for isolated in list(_LIVE):
        isolated._after_fork()


os.register_at_fork(after_in_child=_forked)

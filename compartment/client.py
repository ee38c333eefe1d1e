"""compartment submit, and compartment.submit(): the resident supervisor's thin client.

Unprivileged: it runs as the MTA's user (Postfix pipe's user=, qmail-local's, Exim's) and can
ask the daemon for no more than that user's rule allows.  It takes run's options, sends one
request with its descriptors 0, 1, 2 (and those given with --fd) over the daemon's socket, waits
for the answer, writes the reason line and the agent's diagnostics to its stderr and exits with
the status the daemon decided — the same statuses, first line and report as `compartment run`.

The command must start fast, so this module imports only C modules of the standard library
(posix, _socket, _struct through protocol, sys): no argparse, no os, no policy loader, nothing of
compartment but the protocol.  The daemon unreachable, refusing, or gone mid-delivery is a
temporary failure (75, or 111 for qmail) with the reason; never a run of our own instead, never a
success without the daemon's word.
"""

from __future__ import annotations

import _socket
import _struct
import posix
import select
import sys
import time

from compartment import protocol

TYPE_CHECKING = False  # not typing's: importing typing costs the command 1.5 ms
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

    from compartment.report import Result

DEFAULT_SOCKET = "/run/compartment/socket"
START_WAIT_S = 120.0  # for the daemon to start the compartment (it answers in milliseconds)
END_GRACE_S = 30.0  # after the compartment's own wall-clock timeout
USAGE = ("usage: compartment submit [-p POLICY] [--exit-codes sysexits|qmail] "
         "[--agent-exit-codes caller|sysexits|qmail]\n"
         "                          [--report PATH] [--set KEY=VALUE]... [--fd N]... "
         "[--socket PATH] -- PROGRAM [ARG...]\n")
_S_IFMT, _S_IFIFO, _S_IFREG, _S_IFCHR = 0o170000, 0o010000, 0o100000, 0o020000


class Failed(Exception):
    """The client could not get an answer: a temporary failure, with the reason."""


class Options:
    __slots__ = ("policy", "caller_qmail", "agent", "report", "sets", "fds", "socket",
                 "program", "help")

    def __init__(self) -> None:
        self.policy, self.caller_qmail, self.agent, self.report = "filter", False, "", ""
        self.sets: list[str] = []
        self.fds: list[int] = []
        self.socket, self.program, self.help = DEFAULT_SOCKET, [], False


def command() -> None:
    """`compartment submit ...` and `compartment status` (bin/compartment starts them with
    python -I -S); never returns."""
    args = sys.argv[1:]
    if args[:1] == ["status"]:
        path = DEFAULT_SOCKET
        if args[1:2] == ["--socket"] and len(args) == 3:
            path = args[2]
        elif len(args) == 2 and args[1].startswith("--socket="):
            path = args[1].partition("=")[2]
        elif args[1:] in (["-h"], ["--help"]):  # asked for: the usage is the answer
            _write(1, b"usage: compartment status [--socket PATH]\n")
            posix._exit(0)
        elif len(args) > 1:
            _write(2, b"usage: compartment status [--socket PATH]\n")
            posix._exit(64)  # EX_USAGE: not a delivery
        posix._exit(status(path))
    if args[:1] == ["submit"]:
        args = args[1:]
    qmail = "--exit-codes=qmail" in args or _pairs(args, "--exit-codes", "qmail")
    try:
        options = parse(args)
        if options.help:
            posix.write(1, USAGE.encode())
            posix._exit(0 if not options.program else _temporary(options.caller_qmail))
        exit_status, text = _deliver(options)
    except Failed as err:
        exit_status, text = _temporary(qmail), _reason_line(str(err), qmail)
    except Exception as err:  # noqa: BLE001 - the one catch-all: exit 1 would bounce the mail
        exit_status = _temporary(qmail)
        text = _reason_line(f"internal error: {type(err).__name__}: {err}", qmail)
    _write(2, text)
    posix._exit(exit_status)


def status(socket_path: str = DEFAULT_SOCKET) -> int:
    """compartment status: the daemon's own account, printed; 0, or 75 if it cannot be had."""
    data = protocol.encode_request(protocol.STATUS, 0, (), "", "", [], [], [])
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(START_WAIT_S)
        sock.connect(socket_path)
        sock.send(data)
        kind, value = protocol.decode_answer(sock.recv(protocol.MAX_ANSWER_BYTES + 1))
    except (OSError, protocol.ProtocolError) as err:
        _write(2, f"compartment status: {socket_path}: {err}\n".encode())
        return _temporary(False)
    finally:
        sock.close()
    if kind == protocol.RESULT:  # refused
        _write(2, f"compartment status: {value['reason']}\n".encode())
        return _temporary(False)
    _write(1, str(value).encode())
    return 0


def submit(argv: Sequence[str], policy_name: str = "filter", *, stdin: int = 0,
           stdout: int = 1, stderr: int = 2, env: Mapping[str, str] | None = None,
           exit_codes: str = "sysexits", agent_exit_codes: str | None = None,
           overrides: Sequence[str] = (), fds: Sequence[int] = (), report: str | None = None,
           socket_path: str = DEFAULT_SOCKET) -> Result:
    """One delivery through the resident supervisor (compartment serve): argv run under the
    named policy, with stdin, stdout and stderr as its descriptors 0, 1, 2 and each of `fds`
    at its own number.  Like compartment.run, it never raises for a delivery that went wrong:
    that is a Result, with a temporary-failure status when the daemon could not be asked."""
    from compartment.exits import Outcome
    from compartment.report import Result

    options = Options()
    options.policy, options.caller_qmail = policy_name, exit_codes == "qmail"
    options.agent, options.report = agent_exit_codes or "", report or ""
    options.sets, options.fds = list(overrides), list(fds)
    options.socket, options.program = socket_path, list(argv)
    environment = (posix.environ if env is None else
                   {k.encode(): v.encode("utf-8", "surrogateescape") for k, v in env.items()})
    started = _monotonic()
    try:
        answer, text = _ask(options, (stdin, stdout, stderr), environment)
    except Failed as err:
        _write(stderr, _reason_line(str(err), options.caller_qmail))
        return Result(outcome=Outcome.INTERNAL_ERROR, exit_status=_temporary(
            options.caller_qmail), reason=str(err), policy=policy_name,
            program=argv[0] if argv else "", argv=tuple(argv),
            wall_s=round(_monotonic() - started, 6))
    _write(stderr, text)
    return Result(**{**answer, "outcome": Outcome(answer["outcome"]), "policy": policy_name,
                     "argv": tuple(argv)})


def parse(args: list[str]) -> Options:
    """run's options, and --fd and --socket; raises Failed for a usage error."""
    options = Options()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            options.program = args[i + 1:]
            break
        if not arg.startswith("-") or arg == "-":
            options.program = args[i:]
            break
        name, eq, value = arg.partition("=")
        if name in ("-h", "--help"):
            options.help = True
            i += 1
            continue
        if name.startswith("-p") and name not in ("-p", "--policy") and not eq:
            name, value, eq = "-p", arg[2:], "="
        if name not in _TAKES_VALUE:
            raise Failed(f"compartment submit: unknown option {arg} ({USAGE.strip()})")
        if not eq:
            if i + 1 >= len(args):
                raise Failed(f"compartment submit: {name} needs a value")
            value = args[i + 1]
            i += 1
        _TAKES_VALUE[name](options, value)
        i += 1
    if not options.program and not options.help:
        raise Failed("compartment submit: no PROGRAM given (compartment submit [OPTIONS] -- "
                     "PROGRAM [ARG...])")
    return options


def _set_policy(options: Options, value: str) -> None:
    options.policy = value


def _set_exit_codes(options: Options, value: str) -> None:
    options.caller_qmail = _convention(value, "--exit-codes") == "qmail"


def _set_agent(options: Options, value: str) -> None:
    options.agent = _convention(value, "--agent-exit-codes")


def _set_report(options: Options, value: str) -> None:
    options.report = value


def _add_set(options: Options, value: str) -> None:
    options.sets.append(value)


def _add_fd(options: Options, value: str) -> None:
    if not value.isdigit() or not 3 <= int(value) <= protocol.MAX_FD_NUMBER:
        raise Failed(f"compartment submit: --fd {value}: expected a descriptor number from 3 "
                     f"to {protocol.MAX_FD_NUMBER}")
    options.fds.append(int(value))


def _set_socket(options: Options, value: str) -> None:
    options.socket = value


_TAKES_VALUE = {"-p": _set_policy, "--policy": _set_policy, "--exit-codes": _set_exit_codes,
                "--agent-exit-codes": _set_agent, "--report": _set_report, "--set": _add_set,
                "--fd": _add_fd, "--socket": _set_socket}


def _convention(value: str, option: str) -> str:
    allowed = ("caller", "sysexits", "qmail") if option == "--agent-exit-codes" else \
        ("sysexits", "qmail")
    if value not in allowed:
        raise Failed(f"compartment submit: {option} {value}: expected {' or '.join(allowed)}")
    return value


def _deliver(options: Options) -> tuple[int, bytes]:
    answer, text = _ask(options, (0, 1, 2), posix.environ)
    return answer["exit_status"], text


def _ask(options: Options, std: tuple[int, int, int],
         environment: Mapping[bytes, bytes]) -> tuple[dict[str, Any], bytes]:
    """Send the request, wait for the result: (the result's fields, the caller's stderr)."""
    flags = protocol.CALLER_QMAIL if options.caller_qmail else 0
    if options.agent:  # "caller": the caller's own, which the request says as such
        qmail = options.agent == "qmail" or (options.agent == "caller" and options.caller_qmail)
        flags |= protocol.AGENT_GIVEN | (protocol.AGENT_QMAIL if qmail else 0)
    report = options.report
    if report and not report.startswith("/"):
        report = posix.getcwd() + "/" + report
    # Only names the policy could pass: a variable named otherwise is nobody's business.
    env = [(name, value) for name, value in environment.items() if _env_name(name)]
    try:
        data = protocol.encode_request(protocol.RUN, flags, (0, 1, 2, *options.fds),
                                       options.policy, report, options.program, env,
                                       options.sets)
    except protocol.ProtocolError as err:
        raise Failed(f"compartment submit: {err}") from None
    relay = Relay(std)
    try:
        answer = _exchange(options.socket, data, (*relay.fds, *options.fds), relay)
    finally:
        relay.close()
    if answer.pop("refused"):
        text = _reason_line(answer["reason"], options.caller_qmail, "4.3.5")
        answer["exit_status"] = _temporary(options.caller_qmail)
    else:
        text = answer["stderr"]
    del answer["stderr"]
    return answer, text


def _exchange(path: str, data: bytes, fds: tuple[int, ...], relay: Relay) -> dict[str, Any]:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(path)
        except OSError as err:
            raise Failed(f"cannot reach the daemon at {path}: {err.strerror} (is compartment "
                         "serve running?); the message is kept") from None
        rights = _struct.pack(f"{len(fds)}i", *fds)
        unsent = ""
        try:
            sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        except OSError as err:  # refused before it read the request: its answer says why
            unsent = f" (sending the request: {err.strerror})"
        relay.sent()
        return _wait(sock, relay, unsent)
    finally:
        sock.close()


def _wait(sock: _socket.socket, relay: Relay, unsent: str) -> dict[str, Any]:
    """The answers: ACCEPTED (the compartment runs, with this timeout), then RESULT."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    for fd in relay.readers:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + START_WAIT_S
    while True:
        wait_ms = int((deadline - time.monotonic()) * 1000)
        if wait_ms <= 0:
            raise Failed("no answer from the daemon in time; the message is kept")
        for fd, _ in poller.poll(wait_ms):
            if fd != sock.fileno():
                if not relay.pump(fd):
                    poller.unregister(fd)
                continue
            try:
                data = sock.recv(protocol.MAX_ANSWER_BYTES + 1)
                kind, value = protocol.decode_answer(data) if data else (0, None)
            except (OSError, protocol.ProtocolError) as err:
                raise Failed(f"bad answer from the daemon: {err}; the message is kept") \
                    from None
            if kind == protocol.ACCEPTED:
                deadline = time.monotonic() + value / 1000 + END_GRACE_S
            elif kind == protocol.RESULT:
                relay.drain()
                return value
            else:
                raise Failed("the daemon closed the connection before the delivery's end (it "
                             f"was stopped or died){unsent}; the message is kept")


class Relay:
    """A terminal or a socket as stdout or stderr, which the daemon could block on, is given a
    pipe of ours instead, copied through while we wait; one pipe when both are one file, so
    that the agent's output is treated as `compartment run` treats it."""

    def __init__(self, std: tuple[int, int, int]) -> None:
        self.fds = list(std)
        self.readers: dict[int, int] = {}  # our pipe's read end -> the real descriptor
        self._writers: list[int] = []
        same = _same_file(std[1], std[2])
        for index in (1, 2):
            if _direct(std[index]):
                continue
            if index == 2 and same:
                self.fds[2] = self.fds[1]
                continue
            read_end, write_end = posix.pipe2(posix.O_CLOEXEC)
            self.readers[read_end] = std[index]
            self._writers.append(write_end)
            self.fds[index] = write_end

    def sent(self) -> None:
        """The daemon has its own copies now: ours would keep the pipes from ending."""
        for fd in self._writers:
            posix.close(fd)
        self._writers = []

    def pump(self, fd: int) -> bool:
        data = posix.read(fd, 65536)
        if data:
            _write(self.readers[fd], data)
        return bool(data)

    def drain(self) -> None:
        for fd in self.readers:
            while self.pump(fd):
                continue

    def close(self) -> None:
        self.sent()
        for fd in self.readers:
            posix.close(fd)
        self.readers = {}


def _direct(fd: int) -> bool:
    """May the daemon write to fd itself: a pipe, a file, /dev/null (or not open at all, which
    the daemon refuses with a reason)?"""
    try:
        info = posix.fstat(fd)
    except OSError:
        return True
    kind = info.st_mode & _S_IFMT
    return kind in (_S_IFIFO, _S_IFREG) or (kind == _S_IFCHR and
                                             info.st_rdev == posix.makedev(1, 3))


def _same_file(a: int, b: int) -> bool:
    try:
        one, two = posix.fstat(a), posix.fstat(b)
    except OSError:
        return False
    return (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


def _env_name(name: bytes) -> bool:
    return bool(name) and not name[:1].isdigit() and \
        name.replace(b"_", b"a").isalnum() and name.isascii()


def _pairs(args: list[str], option: str, value: str) -> bool:
    head = args[:args.index("--")] if "--" in args else args
    return any(a == option and b == value for a, b in zip(head, head[1:], strict=False))


def _temporary(qmail: bool) -> int:
    return 111 if qmail else 75


def _reason_line(reason: str, qmail: bool, code: str = "4.3.0") -> bytes:
    """A reason line of the client's own: 4.3.0 when the daemon could not be asked, 4.3.5 when
    it refused (not allowed, or not valid: a configuration matter)."""
    return (("" if qmail else code + " ") + f"compartment: {reason}\n").encode(
        "utf-8", "surrogateescape")


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[posix.write(fd, view):]
    except OSError:
        return  # the caller closed it: the exit status still tells


def _monotonic() -> float:
    return time.monotonic()

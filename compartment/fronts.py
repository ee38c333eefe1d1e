"""What the LMTP and milter fronts share: the listening socket, the run request, the spool,
the reply a Result stands for, the mail log, and the daemon's life (SIGHUP, SIGTERM).

Unprivileged: a front runs as its own system user, parses the MTA's protocol, and hands every
agent run to the resident supervisor (`compartment serve`) through its client, with the message
as a sealed memfd.  It never runs agent code and holds no privilege; it can ask the supervisor
for no more than its user's rule in serve.toml allows.  Not part of the trusted core.

The supervisor's client is the seam: `resident_submit()` picks it when the front starts; tests
that run without the daemon hand the fronts a stand-in with the same signature instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import itertools
import os
import re
import signal
import socket
import stat
import syslog
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from compartment.exits import Convention, Outcome, Verdict, classify

if TYPE_CHECKING:
    from compartment.report import Result

DEFAULT_SUPERVISOR_SOCKET = "/run/compartment/socket"
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
REPLY_TEXT_BYTES = 200  # of the agent's first line, in a reply the MTA logs
PLACEHOLDERS = ("local", "domain", "recipient", "sender", "extension", "mailbox")
_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


class FrontError(Exception):
    """A front cannot start or go on: bad options, a socket it cannot listen on."""


class Submit(Protocol):
    def __call__(self, argv: Sequence[str], policy_name: str, *, stdin: int, stdout: int,
                 stderr: int, env: Mapping[str, str] | None = None, exit_codes: str = ...,
                 agent_exit_codes: str | None = None, overrides: Sequence[str] = ...,
                 socket_path: str = ...) -> Result: ...


def resident_submit() -> Submit:
    """compartment.submit, the resident supervisor's client (compartment.client)."""
    from compartment.client import submit

    return submit


# --- the listening socket ------------------------------------------------------------------

@dataclass(frozen=True)
class Listen:
    kind: str  # "unix", "inet", "systemd"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return {"unix": f"unix:{self.path}", "inet": f"{self.host}:{self.port}",
                "systemd": "the socket systemd passed"}[self.kind]


def parse_listen(text: str, milter: bool) -> Listen:
    """LMTP: unix:PATH, HOST:PORT or [V6]:PORT; milter (Sendmail's forms): unix:PATH,
    local:PATH, inet:PORT@HOST, inet6:PORT@HOST; both: systemd (socket activation)."""
    if text == "systemd":
        return Listen("systemd")
    scheme, colon, rest = text.partition(":")
    if scheme in ("unix", "local") and rest.startswith("/"):
        return Listen("unix", path=rest)
    if milter and scheme in ("inet", "inet6") and colon:
        port, _, host = rest.partition("@")
        return Listen("inet", host=host or ("::1" if scheme == "inet6" else "127.0.0.1"),
                      port=_port(port, text))
    if not milter and ":" in text and scheme not in ("unix", "local"):
        host, _, port = text.rpartition(":")
        return Listen("inet", host=host.strip("[]") or "127.0.0.1", port=_port(port, text))
    forms = ("unix:/PATH, inet:PORT@HOST, inet6:PORT@HOST" if milter else
             "unix:/PATH, HOST:PORT") + " or systemd"
    raise FrontError(f"--listen {text}: expected {forms}")


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise FrontError(f"--listen {whole}: {text!r} is not a port number")
    return int(text)


def listening_socket(listen: Listen, mode: int = 0o660, group: str | None = None
                     ) -> socket.socket:
    """Bound and listening.  A unix socket gets `mode` and `group` (one of ours) and listens
    under a temporary name before it is renamed into place: nobody else connects in between,
    and a client that finds the name finds a socket that accepts."""
    if listen.kind == "systemd":
        return _systemd_socket()
    if listen.kind == "unix":
        return _unix_socket(listen.path, mode, group)
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as err:
        sock.close()
        raise FrontError(f"cannot listen on {listen}: {err.strerror}") from None
    sock.listen(128)
    return sock


def _unix_socket(path: str, mode: int, group: str | None) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FrontError(f"cannot listen on unix:{path}: something else is there")
    aside = f"{path}.{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777)  # born unreachable; opened up below
    try:
        sock.bind(aside)
        if group is not None:
            os.chown(aside, -1, grp.getgrnam(group).gr_gid)
        os.chmod(aside, mode)
        sock.listen(128)
        os.rename(aside, path)  # replaces a socket a front that died left there
    except (OSError, KeyError) as err:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(aside)
        why = f"no group {group!r}" if isinstance(err, KeyError) else err.strerror
        raise FrontError(f"cannot listen on unix:{path}: {why}") from None
    finally:
        os.umask(old_umask)
    return sock


def _systemd_socket() -> socket.socket:
    """The first socket systemd passed (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS, from 3)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or \
            int(os.environ.get("LISTEN_FDS", "0") or 0) < 1:
        raise FrontError("--listen systemd: systemd passed no socket (LISTEN_FDS)")
    sock = socket.socket(fileno=3)
    os.set_inheritable(3, False)
    return sock


# --- the run request -----------------------------------------------------------------------

def check_templates(program: Sequence[str], overrides: Sequence[str]) -> None:
    """Placeholders may appear in argv items; in --set values only {mailbox}, which the
    administrator's lookup chose: an envelope address there is the sender's to shape."""
    for setting in overrides:
        for name in _PLACEHOLDER_RE.findall(setting):
            if name != "mailbox":
                raise FrontError(f"--set {setting}: only {{mailbox}} may appear in a --set "
                                 f"value ({{{name}}} comes from the envelope)")


def expand(template: str, values: Mapping[str, str]) -> str:
    """Each {name} of PLACEHOLDERS replaced by its value, once: a value is never read again
    for placeholders, and the result is one argv item, never a shell's word."""
    return _PLACEHOLDER_RE.sub(lambda match: values.get(match.group(1), ""), template)


@dataclass(frozen=True)
class Runner:
    """How the front asks for one agent run."""
    program: tuple[str, ...]
    policy: str
    overrides: tuple[str, ...] = ()
    agent_exit_codes: str | None = None
    socket_path: str = DEFAULT_SUPERVISOR_SOCKET
    submit: Submit = field(default_factory=resident_submit)

    def run(self, values: Mapping[str, str], env: Mapping[str, str], stdin: int,
            stdout: int, stderr: int) -> Result:
        """Blocking: the supervisor's answer (a Result, never an exception for a run that
        went wrong; the client says why on `stderr` when it could not ask)."""
        argv = [expand(item, values) for item in self.program]
        overrides = [expand(item, values) for item in self.overrides]
        return self.submit(argv, self.policy, stdin=stdin, stdout=stdout, stderr=stderr,
                           env=dict(env), exit_codes="sysexits",
                           agent_exit_codes=self.agent_exit_codes, overrides=overrides,
                           socket_path=self.socket_path)


class Spool:
    """The message, written once into a memfd, then sealed and handed read-only (each run
    gets the same descriptor; a sealed memfd cannot change under a later run)."""

    def __init__(self, name: str = "message") -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.size = 0
        self.sealed_fd: int | None = None

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += len(data)

    def seal(self) -> int:
        """A read-only descriptor at offset 0 (each run gets it anew: see `reader`)."""
        if self.sealed_fd is None:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self.sealed_fd = self.reader()
        return self.sealed_fd

    def reader(self) -> int:
        """A new read-only open of the spool with its own offset at 0."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in (self.fd, self.sealed_fd):
            if fd is not None:
                os.close(fd)
        self.fd, self.sealed_fd = -1, None


def capture() -> int:
    """A memfd for what an agent writes (its output, bounded by the policy's output_bytes)."""
    return os.memfd_create("output", os.MFD_CLOEXEC)


def first_line(fd: int) -> str:
    """The first line written to `fd`, printable ASCII only, for a reply the MTA logs."""
    head = os.pread(fd, 4096, 0).split(b"\n", 1)[0]
    text = "".join(c if " " <= c <= "~" else "?" for c in head.decode("ascii", "replace"))
    return text.strip()[:REPLY_TEXT_BYTES]


# --- what a Result stands for ---------------------------------------------------------------

_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+(.*)$")
# The agent's permanent verdicts (sysexits.h) and the reply each stands for.
_PERMANENT = {65: ("554", "5.6.0", "message data refused"),
              67: ("550", "5.1.1", "no such user"),
              68: ("550", "5.1.2", "no such host"),
              69: ("550", "5.0.0", "service unavailable"),
              77: ("550", "5.7.1", "not permitted")}


@dataclass(frozen=True)
class Reply:
    kind: Verdict  # SUCCESS, TEMPORARY or PERMANENT
    code: str      # "250", "451", "550"...
    enhanced: str  # "2.0.0", "4.4.7"...
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


def reply_for(result: Result, said: str, delivered: str = "delivered") -> Reply:
    """The reply for a run: 2xx only when the run is a success in the contract's sense, 5xx
    only for a permanent status (the agent's verdict, or what the policy made permanent),
    4xx for everything else.  `said` is the first line of what the run wrote on stderr: the
    runner's or the agent's reason, whose own RFC 3463 code is kept when its class agrees."""
    status = result.exit_status
    if result.outcome is Outcome.OK and status == 0:
        return Reply(Verdict.SUCCESS, "250", "2.0.0", delivered)
    verdict = classify(status, Convention.SYSEXITS)
    given = _ENHANCED_RE.match(said)
    if verdict is Verdict.PERMANENT:
        code, enhanced, text = _PERMANENT.get(status, ("554", "5.3.0", "rejected"))
        if given and given.group(1) == "5":
            enhanced, text = said.split(None, 1)[0], given.group(4)
        return Reply(Verdict.PERMANENT, code, enhanced, text or result.reason)
    enhanced, text = "4.3.0", said or result.reason
    if given and given.group(1) == "4":
        enhanced, text = said.split(None, 1)[0], given.group(4)
    return Reply(Verdict.TEMPORARY, "451", enhanced, text[:REPLY_TEXT_BYTES])


# --- the mail log ---------------------------------------------------------------------------

class MailLog:
    """One line per message and per recipient, like Postfix's daemons (`QUEUEID: to=<...>,
    status=...`): to syslog's mail facility, or (`--log stderr`, for a supervisor that keeps
    its daemons' stderr, such as systemd's journal) to stderr."""

    def __init__(self, ident: str, destination: str = "syslog") -> None:
        self.ident, self.to_syslog = ident, destination == "syslog"
        if self.to_syslog:
            syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_MAIL)

    def info(self, line: str) -> None:
        self._write(syslog.LOG_INFO, _printable(line))

    def warning(self, line: str) -> None:
        self._write(syslog.LOG_WARNING, "warning: " + _printable(line))

    def _write(self, priority: int, line: str) -> None:
        if self.to_syslog:
            syslog.syslog(priority, line)
            return
        with contextlib.suppress(OSError):  # stderr gone: nothing else to tell it to
            os.write(2, f"{self.ident}[{os.getpid()}]: {line}\n".encode(errors="replace"))


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


_sequence = itertools.count()


def queue_id() -> str:
    """An id for a transaction, unique in this front's life and across restarts: the time in
    microseconds and a counter, in base 36, as Postfix's long queue ids are."""
    now = int(time.time() * 1_000_000)
    return _base36(now) + _base36(next(_sequence) % 1296).rjust(2, "0")


def _base36(number: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    text = ""
    while number:
        number, digit = divmod(number, 36)
        text = digits[digit] + text
    return text or "0"


# --- the daemon's life ----------------------------------------------------------------------

class Session(Protocol):
    busy: bool

    def close(self) -> None: ...


class Front:
    """A front's loop: sessions counted and bounded, runs in a thread pool (the client
    blocks), SIGHUP reloads, SIGTERM and SIGINT drain (no new connection; a session ends
    after the delivery in hand; what is left after `drain_s` is cut, and the MTA retries)."""

    def __init__(self, log: MailLog, max_sessions: int, max_runs: int,
                 reload: Callable[[], None] = lambda: None, drain_s: float = 330.0) -> None:
        self.log, self.max_sessions, self.drain_s = log, max_sessions, drain_s
        self.sessions: set[Session] = set()
        self.executor = ThreadPoolExecutor(max_workers=max_runs, thread_name_prefix="run")
        self.stopping = False
        self._reload = reload
        self._stop: asyncio.Event | None = None

    def full(self) -> bool:
        return len(self.sessions) >= self.max_sessions

    async def call(self, function: Callable[..., Result], *args: Any) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    def reload(self) -> None:
        try:
            self._reload()
        except FrontError as err:
            self.log.warning(f"reload failed, the old configuration stays: {err}")
            return
        self.log.info("reloaded")

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def serve(self, server: asyncio.AbstractServer, ready: str) -> None:
        """Serve until SIGTERM or SIGINT, then drain; `ready` is logged once the signals are
        ours (before that, a SIGTERM would end the process by its default action)."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        self.log.info(ready)
        try:
            await self._stop.wait()
        finally:
            for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        await self.drain(server)

    async def drain(self, server: asyncio.AbstractServer) -> None:
        self.stopping = True
        server.close()
        self.log.info(f"stopping: {len(self.sessions)} sessions open, "
                      f"{sum(s.busy for s in self.sessions)} delivering")
        for session in list(self.sessions):
            if not session.busy:
                session.close()
        deadline = time.monotonic() + self.drain_s
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):  # past the deadline: cut; the MTA retries
            session.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.log.info("stopped")

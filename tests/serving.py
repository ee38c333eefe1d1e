"""Test helpers: a resident supervisor (`compartment serve`) of the test's own, and clients.

A module of its own (not conftest) so that test modules, the hostile harness and the soak can
import it by a unique name.  Each Daemon has a private socket, configuration and log (--log
stderr), so that tests never touch /run/compartment/socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from compartment import protocol

COMMAND = str(Path(sys.executable).parent / "compartment")  # the installed bin/compartment
PYTHON = sys.executable


@dataclass
class Submitted:
    status: int
    stdout: bytes
    stderr: bytes


def open_directory() -> Path:
    """A directory every uid can reach (pytest's own are root's alone), removed at exit."""
    import atexit
    import shutil

    directory = Path(tempfile.mkdtemp(prefix="compartment-test-"))
    directory.chmod(0o755)
    if not os.environ.get("COMPARTMENT_TEST_KEEP"):
        atexit.register(shutil.rmtree, directory, True)
    return directory


class Daemon:
    def __init__(self, directory: Path | None = None, config: str = "",
                 request_timeout_s: float = 2.0) -> None:
        directory = directory or open_directory()  # clients of other uids reach the socket
        self.directory = directory
        self.socket = str(directory / "socket")
        self.config = directory / "serve.toml"
        self.log_path = directory / "daemon.log"
        self.request_timeout_s = request_timeout_s
        self.process: subprocess.Popen | None = None
        if config:
            self.write_config(config)

    def write_config(self, text: str) -> None:
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(self.config, 0o644)

    def start(self) -> Daemon:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the daemon's stderr, kept open by it
        self.process = subprocess.Popen(
            [COMMAND, "serve", "--socket", self.socket, "--config", str(self.config), "--log",
             "stderr", "--request-timeout", str(self.request_timeout_s)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"compartment serve exited {self.process.returncode}: "
                                   f"{self.log()}")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(self.socket)
                return self
            except OSError:
                time.sleep(0.02)
            finally:
                probe.close()
        raise RuntimeError(f"compartment serve did not listen within 20 s: {self.log()}")

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)
        return self.process.wait(timeout=timeout_s)

    def reload(self) -> None:
        assert self.process is not None
        mark = len(self.log())
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if "reload" in self.log()[mark:]:
                return
            time.sleep(0.02)
        raise RuntimeError("the daemon did not log its reload")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def submit(self, argv: list[str], options: list[str] = (), message: bytes = b"",
               user: int | None = None, stdout=None, stderr=None,
               timeout_s: float = 60) -> Submitted:
        """`compartment submit` as a whole process, as an MTA runs it (as `user`, or root)."""
        with tempfile.TemporaryFile() as spool, tempfile.TemporaryFile() as out, \
                tempfile.TemporaryFile() as err:
            spool.write(message)
            spool.flush()
            # Read-only, as an MTA hands the message (qmail's queue file, a pipe).
            stdin = os.open(f"/proc/self/fd/{spool.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
            ids = {} if user is None else {"user": user, "group": user, "extra_groups": []}
            try:
                done = subprocess.run([COMMAND, "submit", "--socket", self.socket, *options,
                                       "--", *argv], stdin=stdin, stdout=stdout or out,
                                      stderr=stderr or err, timeout=timeout_s, check=False,
                                      **ids)
            finally:
                os.close(stdin)
            out.seek(0)
            err.seek(0)
            return Submitted(done.returncode, out.read(), err.read())


def raw_request(path: str, data: bytes, fds: list[int] = (), timeout_s: float = 10
                ) -> tuple[int, object] | None:
    """Send one datagram (anything at all) with descriptors; the decoded answer, or None when
    the daemon closed without one."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout_s)
    try:
        sock.connect(path)
        socket.send_fds(sock, [data], list(fds))
        while True:
            answer = sock.recv(protocol.MAX_ANSWER_BYTES + 1)
            if not answer:
                return None
            kind, value = protocol.decode_answer(answer)
            if kind != protocol.ACCEPTED:
                return kind, value
    finally:
        sock.close()


def request(argv: list[str], policy: str = "filter", sets: list[str] = (),
            fds: tuple[int, ...] = (0, 1, 2), env: dict[str, str] | None = None,
            report: str = "", flags: int = 0) -> bytes:
    return protocol.encode_request(protocol.RUN, flags, fds, policy, report, argv,
                                   list((env or {}).items()), list(sets))


def uid_processes(uid_range: tuple[int, int], name: str = "") -> list[int]:
    """Pids of processes whose real uid is in the range (agents left behind), and whose name
    is `name` if given (the daemon keeps compartments prepared ahead in its pool too)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        uid = int(fields.get("Uid", "-1 ").split()[0])
        if uid_range[0] <= uid <= uid_range[1] and name in ("", fields["Name"].strip()):
            found.append(int(entry))
    return found


def wait_for(predicate, timeout_s: float = 10, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


__all__ = ["PYTHON", "Daemon", "Submitted", "open_directory", "raw_request", "request", "signal",
           "uid_processes", "wait_for"]

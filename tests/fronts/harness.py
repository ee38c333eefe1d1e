"""Start a front as a process of its own (tests/fronts/launch.py: as root, with the stand-in
for the supervisor's client) and talk to it: a raw LMTP client that reads one reply per
recipient after the dot, which smtplib does not."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

LAUNCH = Path(__file__).parent / "launch.py"
PYTHON = "/usr/bin/python3"  # the agents' interpreter: visible inside the filter/deliver view
START_S = 30.0


COMMAND = str(Path(sys.executable).parent / "compartment")  # the installed bin/compartment


class Running:
    """A front process, its socket and its log (stderr, --log stderr): with the stand-in for
    the supervisor's client, as root (tests/fronts/launch.py); or, given a uid, the installed
    command as that uid, a client of a real `compartment serve`."""

    def __init__(self, front: str, socket_path: Path, options: Sequence[str],
                 program: Sequence[str], log: Path, uid: int | None = None,
                 groups: Sequence[int] = ()) -> None:
        self.socket_path, self.log_path = socket_path, log
        command = [sys.executable, str(LAUNCH)]
        if uid is not None:
            command = ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                       f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
                       COMMAND]
        if socket_path.exists():  # a stopped front's: the new one's is waited for below
            socket_path.unlink()
        argv = [*command, front, "--listen", f"unix:{socket_path}", "--log", "stderr",
                *options, "--", *program]
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + START_S
        while "listening on" not in self.log:  # logged once its signals are its own
            if self.process.poll() is not None:
                raise AssertionError(f"the front exited {self.process.returncode}: {self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the front did not listen in {START_S} s: {self.log}")
            time.sleep(0.05)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the front did not stop on SIGTERM: {self.log}") from None


class Client:
    """LMTP over a unix socket, line by line."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(path))
        self.buffer = b""
        self.greeting = self.reply()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by the server; had {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> list[str]:
        """One reply, all its lines."""
        lines = [self.line().decode()]
        while lines[-1][3:4] == "-":
            lines.append(self.line().decode())
        return lines

    def command(self, text: str) -> list[str]:
        self.send(text.encode() + b"\r\n")
        return self.reply()

    def transaction(self, sender: str, recipients: Sequence[str], message: bytes
                    ) -> tuple[list[str], list[str]]:
        """(the RCPT replies, the replies after the dot: one per accepted recipient)."""
        assert self.command(f"MAIL FROM:<{sender}>")[0].startswith("250")
        rcpt = [self.command(f"RCPT TO:<{r}>")[0] for r in recipients]
        accepted = sum(r.startswith("250") for r in rcpt)
        if not accepted:
            return rcpt, []
        assert self.command("DATA")[0].startswith("354")
        self.send(wire(message))
        return rcpt, [self.reply()[0] for _ in range(accepted)]


def wire(message: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, dots doubled, the final dot."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


def maildir(root: Path, name: str, uid: int = 65534) -> Path:
    """An empty Maildir owned by uid (deliver runs the agent as the Maildir's owner)."""
    path = root / name / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    for directory in (path.parent, path, *(path / s for s in ("tmp", "new", "cur"))):
        os.chown(directory, uid, uid)
    return path


def delivered(path: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((path / "new").iterdir())]


class MilterClient:
    """The MTA's side of the milter protocol, packet by packet."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(path))
        self.buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet(self) -> tuple[bytes, bytes]:
        from compartment.milter_protocol import split_packets

        while True:
            found = split_packets(self.buffer)
            if found:
                code, data = found[0]
                # put back whatever came after this one
                rest = b"".join(len(d + c).to_bytes(4, "big") + c + d for c, d in found[1:])
                self.buffer[:0] = rest
                return code, data
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the milter")
            self.buffer += chunk

    def until_final(self) -> list[tuple[bytes, bytes]]:
        """Replies to the end of a message: modifications and progress, then the verdict."""
        replies = []
        while True:
            code, data = self.packet()
            replies.append((code, data))
            if code in (b"a", b"c", b"r", b"t", b"y", b"d"):
                return replies

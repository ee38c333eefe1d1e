"""What a hostile agent would leave outside if it got out, and how the test looks for it.

Test side, root, outside every compartment.  For each case the test plants secrets, opens
loopback listeners (TCP, UDP, a unix socket path, an abstract socket) and starts two canaries (one
with the agent's uid, one root) that record every signal and tracer reaching them.  After the
run it looks only outside: new files in the evidence directory, connections to the listeners,
canaries signalled, traced, stopped or dead, secrets in what the caller received, processes that
outlived the compartment.  Nothing the agent says about itself is believed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# A uid outside the shipped pool (60000-60999): cases that attack "a canary with my own uid"
# run the agent with this uid, and the canary with it too.
CANARY_UID = 61234
# The owner of the deliver cases' mail directories (identity.uid = "owner" takes it).
MAIL_UID = 61235
# The unprivileged caller of the "@nobody" cases (an MTA's mail user); the agent keeps this uid.
NOBODY = 65534


class Listeners:
    """Loopback listeners the agents try to reach; every connection or datagram is evidence."""

    def __init__(self, unix_path: Path, abstract_name: str) -> None:
        self.hits: list[str] = []
        self._stop = threading.Event()
        self.tcp = _bound(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0))
        self.tcp_port = self.tcp.getsockname()[1]
        self.udp = _bound(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0))
        self.udp_port = self.udp.getsockname()[1]
        self.unix = _bound(socket.AF_UNIX, socket.SOCK_STREAM, str(unix_path))
        os.chmod(unix_path, 0o777)   # any uid that reached it could connect
        self.abstract = _bound(socket.AF_UNIX, socket.SOCK_STREAM, "\0" + abstract_name)
        sockets = [self.tcp, self.unix, self.abstract]
        with contextlib.suppress(OSError):   # no IPv6 on this host: the agent cannot use it either
            sockets.append(_bound(socket.AF_INET6, socket.SOCK_STREAM, ("::1", self.tcp_port)))
        self._sockets = [*sockets, self.udp]
        self._threads = [threading.Thread(target=self._accept, args=(s,), daemon=True)
                         for s in sockets]
        self._threads.append(threading.Thread(target=self._receive, daemon=True))
        for thread in self._threads:
            thread.start()

    def _accept(self, listener: socket.socket) -> None:
        listener.listen(16)
        listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                peer, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with peer:
                peer.settimeout(0.5)
                try:
                    data = peer.recv(256)
                except OSError:
                    data = b""
            self.hits.append(f"connection to {_describe(listener)}: {data!r}")

    def _receive(self) -> None:
        self.udp.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = self.udp.recv(256)
            except TimeoutError:
                continue
            except OSError:
                return
            self.hits.append(f"datagram to udp {self.udp_port}: {data!r}")

    def close(self) -> None:
        time.sleep(0.1)   # a connection made just before the agent died is still accepted
        self._stop.set()
        for thread in self._threads:
            thread.join()
        for sock in self._sockets:
            sock.close()


def _bound(family: int, kind: int, address: object) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.bind(address)
    return sock


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, bytes | str) and name[:1] in (b"\0", "\0"):
        return f"abstract socket {name[1:]!r}"
    return f"{'unix' if sock.family == socket.AF_UNIX else 'tcp'} {name}"


class Canary:
    """A process outside every compartment that writes a file for each signal or tracer."""

    def __init__(self, program: Path, marks: Path, name: str, uid: int) -> None:
        self.name = name
        self._marks = marks
        ids = {} if uid == 0 else {"user": uid, "group": uid, "extra_groups": []}
        self.process = subprocess.Popen([str(program), str(marks), name, str(os.getpid())],
                                        **ids)
        self._wait_armed()

    def _wait_armed(self) -> None:
        # Signals sent before the handlers are installed would kill it silently; wait for them.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{self.process.pid}/status").read_text()
                caught = next(line for line in status.splitlines() if line.startswith("SigCgt"))
                if int(caught.split()[1], 16):
                    return
            time.sleep(0.005)
        raise RuntimeError(f"canary {self.name} did not start")

    @property
    def pid(self) -> int:
        return self.process.pid

    def traces(self) -> list[str]:
        found = [f"canary {self.name}: {mark.name}"
                 for mark in self._marks.glob(f"canary-{self.name}-*")]
        if self.process.poll() is not None:
            found.append(f"canary {self.name} died: status {self.process.returncode}")
        else:
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state in ("T", "t"):
                    found.append(f"canary {self.name} was stopped (state {state})")
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()   # our own child: started by this test
        self.process.wait()


@dataclass
class Outside:
    """Everything outside the compartment for one case: planted secrets, listeners, canaries."""

    root: Path          # the case's own directory (never shown to the compartment)
    canary_program: Path
    agent_uid: int = CANARY_UID   # the uid of the "same-uid" canary
    token: str = field(default_factory=lambda: secrets.token_hex(8))

    def __post_init__(self) -> None:
        self.evidence = self.root / "evidence"
        self.evidence.mkdir(parents=True)
        os.chmod(self.evidence, 0o1777)   # whoever got out, with any uid, could write here
        self.secrets = {
            "secret-root": (f"SECRET-ROOT-{self.token}", 0o600),
            "world": (f"WORLD-{self.token}", 0o644),
            "target": (f"TARGET-{self.token}", 0o666),
        }
        for name, (text, mode) in self.secrets.items():
            path = self.evidence / name
            path.write_text(text)
            os.chmod(path, mode)
        self.env_secret = f"ENVSECRET-{self.token}"
        self.fd_secret = f"FDSECRET-{self.token}"
        self._planted = {p.name: _digest(p) for p in self.evidence.iterdir()}
        self.abstract_name = f"hostile-{self.token}"
        self.listeners = Listeners(self.evidence / "sock", self.abstract_name)
        self._planted["sock"] = None
        self.canary_same = Canary(self.canary_program, self.evidence, "same-uid", self.agent_uid)
        self.canary_root = Canary(self.canary_program, self.evidence, "root", 0)

    def agent_args(self, supervisor_pid: int = 0) -> list[str]:
        """The leading arguments every agent takes (see agents/agent.h)."""
        return [str(self.evidence), str(self.listeners.tcp_port), str(self.listeners.udp_port),
                str(self.evidence / "sock"), self.abstract_name, str(self.canary_same.pid),
                str(self.canary_root.pid), str(supervisor_pid)]

    def secret_texts(self) -> list[str]:
        return [text for text, _ in self.secrets.values()] + [self.env_secret, self.fd_secret]

    def traces(self, received: bytes) -> list[str]:
        """Evidence of an escape, found outside; `received` is what the caller got back."""
        found = list(self.listeners.hits)
        for path in sorted(self.evidence.iterdir()):
            if path.name.startswith("canary-"):
                continue   # reported by the canaries themselves
            if path.name not in self._planted:
                found.append(f"file appeared outside: {path.name}")
            elif self._planted[path.name] is not None and _digest(path) != self._planted[path.name]:
                found.append(f"planted file changed: {path.name}")
        found += self.canary_same.traces() + self.canary_root.traces()
        found += [f"secret reached the caller: {text}" for text in self.secret_texts()
                  if text.encode() in received]
        return found

    def close(self) -> None:
        self.listeners.close()
        self.canary_same.stop()
        self.canary_root.stop()


def _digest(path: Path) -> str | None:
    if path.is_socket():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def survivors(marker: str, exclude: set[int], grace_s: float = 1.0) -> list[str]:
    """Processes that outlived the compartment: those whose command line holds `marker`, a
    path or token unique to one case that every agent process carries in its argv (forks
    inherit it).  Matching by uid would also find other runs of these tests on the host."""
    deadline = time.monotonic() + grace_s
    needle = marker.encode()
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) in exclude:
                continue
            with contextlib.suppress(OSError):
                if needle not in (proc / "cmdline").read_bytes():
                    continue
                status = (proc / "status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                found.append(f"process survived: pid {proc.name} {fields['Name'].strip()} uid "
                             f"{fields['Uid'].split()[0]} state {fields['State'].strip()}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def kill_survivors(marker: str, exclude: set[int]) -> None:
    """After a failed case, so that one escape does not spoil the next case."""
    for line in survivors(marker, exclude, grace_s=0):
        pid = int(line.split()[3])
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)   # carries this case's marker: an agent we started


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)   # best effort: a test directory under /tmp

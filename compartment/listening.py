"""The resident supervisor's listening socket: systemd's, or one of its own; sd_notify.

Privileged (the daemon, root).  With socket activation (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS)
the socket is systemd's, its mode set by the unit, and connections made while the daemon
restarts wait in its queue.  Otherwise the daemon makes it: bound aside and renamed into place
(a restart never leaves the path missing), root's with the mode and group the configuration
says, refusing to take over the socket of a daemon still listening.  sd_notify(3) is one
datagram to $NOTIFY_SOCKET, in a few lines.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from compartment import serveconfig


def activated() -> bool:
    """Did systemd pass us the listening socket (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS)?"""
    return os.environ.get("LISTEN_PID") == str(os.getpid()) and \
        os.environ.get("LISTEN_FDS", "0").isdigit() and int(os.environ["LISTEN_FDS"]) >= 1


def listener(path: str, config: serveconfig.Config, activated: bool) -> socket.socket:
    """The listening socket: systemd's (socket activation, fd 3), or one of ours at path."""
    if activated:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        sock = socket.socket(fileno=3)
        if sock.type != socket.SOCK_SEQPACKET or sock.family != socket.AF_UNIX:
            raise OSError(errno.EINVAL, "the socket systemd passed is not a unix seqpacket one")
        os.set_inheritable(3, False)
        sock.setblocking(False)
        return sock
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    _take_over(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    aside = f"{path}.new-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside)
    sock.bind(aside)
    set_mode(aside, config)
    sock.listen(128)
    os.rename(aside, path)  # in place at once: a restart never leaves the path missing
    sock.setblocking(False)
    return sock


def set_mode(path: str, config: serveconfig.Config) -> None:
    """Who may connect at all: the socket's group and mode from the configuration.  The path
    is in a directory of root's, and checked to be a socket, not a link to something else."""
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise OSError(errno.EINVAL, f"{path} is not a socket")
    os.chown(path, 0, 0 if config.socket_group is None else config.socket_group)
    os.chmod(path, config.socket_mode())


def _take_over(path: str) -> None:
    """Refuse to start over a live daemon's socket; a stale one is replaced."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        return  # nobody listens: stale
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another compartment serve listens on {path}")


def notify(state: str) -> None:
    """sd_notify(3) in a few lines: one datagram to $NOTIFY_SOCKET, if systemd set it."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return
    target = "\0" + address[1:] if address[0] == "@" else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock, \
            contextlib.suppress(OSError):  # systemd gone: nothing to tell
        sock.sendto(state.encode(), target)

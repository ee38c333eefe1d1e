"""The fronts end to end through a real resident supervisor: `compartment serve` as root, and
`compartment lmtp` and `compartment milter` as unprivileged uids of their own, its clients,
asking only for what their rules in serve.toml grant."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from .harness import PYTHON, Client, Running, delivered, maildir
from .test_lmtp import AGENT, MESSAGE, check_mixed_recipients
from .test_milter import ADD_TOP, REJECT, conversation

sys.path.insert(0, str(Path(__file__).parents[1]))
from serving import Daemon, open_directory  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="compartment serve runs as root (as "
                                "CI does)")
LMTP_UID, MILTER_UID = 64030, 64031  # the fronts' users (no passwd entry needed)


def _config(homes: Path) -> str:
    return f"""
[[allow]]
user = {LMTP_UID}
policies = ["deliver"]
set = ["filesystem.writable", "limits.wall_timeout_s"]
deliver_as_owner = ["{homes}/*/Maildir"]
max_live = 8

[[allow]]
user = {MILTER_UID}
policies = ["filter"]
set = ["limits.wall_timeout_s"]
max_live = 8
"""


@pytest.fixture(scope="module")
def place():
    """A directory every uid reaches: the fronts' own subdirectories for their sockets, the
    Maildirs (nobody's), a recipient map."""
    root = open_directory()
    for name, uid in (("lmtp", LMTP_UID), ("milter", MILTER_UID)):
        (root / name).mkdir()
        os.chown(root / name, uid, uid)
    boxes = {name: maildir(root / "homes", name) for name in ("alice", "bob")}
    lines = [f"{name}@example.test {path}" for name, path in boxes.items()]
    lines += [f"{name} {boxes['bob']}" for name in ("temp", "perm", "slow")]
    (root / "map").write_text("\n".join(lines) + "\n")
    (root / "map").chmod(0o644)
    return root, boxes


@pytest.fixture
def daemon(place):
    root, _ = place
    served = Daemon(config=_config(root / "homes")).start()
    yield served
    served.stop()


def lmtp(root: Path, daemon_socket: str) -> Running:
    return Running("lmtp", root / "lmtp" / "lmtp.sock",
                   ["--recipients", f"map:{root / 'map'}", "--socket", daemon_socket,
                    "--set", "filesystem.writable={mailbox}", "--set", "limits.wall_timeout_s=5"],
                   [PYTHON, "-c", AGENT, "{local}", "{mailbox}"], root / "lmtp.log",
                   uid=LMTP_UID)


def _empty(boxes: dict[str, Path]) -> None:
    for box in boxes.values():
        for message in (box / "new").iterdir():
            message.unlink()


def test_lmtp_front_through_the_daemon(place, daemon):
    root, boxes = place
    _empty(boxes)
    check_mixed_recipients(lmtp(root, daemon.socket), boxes)
    deliveries = [line for line in daemon.log().splitlines()
                  if f"delivery peer=uid:{LMTP_UID}/" in line]
    assert len(deliveries) == 5 and all("uid=65534 " in line for line in deliveries), deliveries


def test_lmtp_daemon_gone_mid_delivery_defers(place, daemon):
    root, boxes = place
    _empty(boxes)
    front = lmtp(root, daemon.socket)
    try:
        client = Client(front.socket_path)
        client.command("LHLO mx.example.test")
        client.command("MAIL FROM:<s@example.org>")
        client.command("RCPT TO:<slow@example.test>")
        client.command("DATA")
        client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        time.sleep(1.0)  # the slow agent is running
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait()
        reply = client.reply()[0]
        assert reply.startswith("451 4.3.0 compartment: "), reply
        # and with no daemon at all, every recipient of the next message is deferred
        _, replies = client.transaction("s@example.org", ["alice@example.test",
                                                          "bob@example.test"], MESSAGE)
        assert all(r.startswith("451 4.3.0 compartment: cannot reach the daemon")
                   for r in replies), replies
    finally:
        front.stop()
    assert not delivered(boxes["alice"]) and not delivered(boxes["bob"])


def test_a_front_gets_no_more_than_its_rule(place, daemon):
    """The milter's user has no rule for `deliver`: the supervisor refuses, the MTA defers."""
    root, _ = place
    front = Running("milter", root / "milter" / "milter.sock",
                    ["--socket", daemon.socket, "-p", "deliver", "--set",
                     f"filesystem.writable={root / 'homes' / 'alice' / 'Maildir'}"],
                    [PYTHON, "-c", ADD_TOP], root / "milter.log", uid=MILTER_UID)
    try:
        _, replies = conversation(front)
    finally:
        front.stop()
    (code, data), = replies
    assert code == b"y" and data.startswith(b"451 4.3.5 compartment: "), data
    assert f"refused peer=uid:{MILTER_UID}/" in daemon.log()


def test_milter_front_through_the_daemon(place, daemon):
    root, _ = place
    for code, expected in ((ADD_TOP, [b"i", b"c"]), (REJECT, [b"y"])):
        front = Running("milter", root / "milter" / "milter.sock",
                        ["--socket", daemon.socket, "--rewrite", "--set",
                         "limits.wall_timeout_s=5"], [PYTHON, "-c", code], root / "milter.log",
                        uid=MILTER_UID)
        try:
            _, replies = conversation(front)
        finally:
            front.stop()
        assert [c for c, _ in replies] == expected, (replies, front.log)
    assert replies[0][1] == b"550 5.7.1 spam, go away\0"

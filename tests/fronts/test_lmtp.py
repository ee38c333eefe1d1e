"""compartment lmtp, over raw LMTP on a unix socket, each run through the stand-in for the
resident supervisor's client (tests/fronts/standin.py): per-recipient replies from the exit
contract, the envelope in the environment and argv, the lookup, the limits, malformed input."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from .harness import PYTHON, Client, Running, delivered, maildir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the stand-in for the supervisor "
                                "runs compartment.run as root, as the resident supervisor does")

# The agent: its behaviour chosen by the recipient's local part.  It stores the message with
# the envelope it was given (environment and argv) as a JSON first line.
AGENT = r"""
import json, os, sys, time
local, mailbox = sys.argv[1], sys.argv[2]
data = sys.stdin.buffer.read()
if local.startswith("temp"):
    sys.exit(75)
if local.startswith("perm"):
    print("5.1.1 this mailbox is closed", file=sys.stderr)
    sys.exit(67)
if local.startswith("slow"):
    time.sleep(30)
names = ("SENDER", "RECIPIENT", "LOCAL", "DOMAIN", "ORIGINAL_RECIPIENT", "USER")
record = {"env": {n: os.environ.get(n) for n in names}, "argv": sys.argv[1:]}
name = f"{time.time_ns()}.{os.getpid()}"
with open(f"{mailbox}/tmp/{name}", "wb") as out:
    out.write(json.dumps(record).encode() + b"\n" + data)
os.rename(f"{mailbox}/tmp/{name}", f"{mailbox}/new/{name}")
"""
MESSAGE = (b"From: a@example.org\nTo: b@example.test\nSubject: hello\n\nline one\n"
           b".a line that starts with a dot\n\r\nlast line\n")


@pytest.fixture
def site(tmp_path):
    """Maildirs for alice, bob and the misbehaving recipients, a map naming them, the
    supervisor's stand-in socket."""
    boxes = {name: maildir(tmp_path, name) for name in ("alice", "bob")}
    lines = [f"{name}@example.test {path}" for name, path in boxes.items()]
    lines += [f"{name} {boxes['bob']}" for name in ("temp", "perm", "slow")]
    (tmp_path / "map").write_text("# recipients\n" + "\n".join(lines) + "\n")
    (tmp_path / "supervisor").write_text("")  # the stand-in's "daemon is up"
    return tmp_path, boxes


def start(tmp_path, *options, supervisor="supervisor", program=None):
    program = program or [PYTHON, "-c", AGENT, "{local}", "{mailbox}"]
    return Running("lmtp", tmp_path / "lmtp.sock",
                   ["--recipients", f"map:{tmp_path / 'map'}", "--socket",
                    str(tmp_path / supervisor), "--set", "filesystem.writable={mailbox}",
                    "--set", "limits.wall_timeout_s=5", *options], program,
                   tmp_path / "front.log")


def test_mixed_recipients_each_get_their_reply(site):
    tmp_path, boxes = site
    check_mixed_recipients(start(tmp_path), boxes)


def check_mixed_recipients(front, boxes):
    """One transaction of six recipients: each reply as the exit contract says, the two
    delivered copies with their envelope, one log line per message and per recipient."""
    try:
        client = Client(front.socket_path)
        assert client.greeting[0].startswith("220 ")
        lhlo = client.command("LHLO mx.example.test")
        assert {"250-PIPELINING", "250-ENHANCEDSTATUSCODES"} <= set(lhlo) or \
            "250 ENHANCEDSTATUSCODES" in lhlo
        rcpt, replies = client.transaction(
            "sender@example.org", ["alice@example.test", "nobody@example.test",
                                   "temp@example.test", "perm@example.test",
                                   "slow@example.test", "bob@example.test"], MESSAGE)
        client.command("QUIT")
    finally:
        assert front.stop() == 0
    assert rcpt[1].startswith("550 5.1.1 ")  # unknown: refused at RCPT time
    assert [r.startswith("250 ") for r in rcpt] == [True, False, True, True, True, True]
    assert replies[0].startswith("250 2.0.0 <alice@example.test> delivered")
    assert replies[1].startswith("451 4.3.0 ")  # the agent's 75: temporary
    assert replies[2] == "550 5.1.1 this mailbox is closed"  # its verdict and its words
    assert replies[3].startswith("451 4.4.7 compartment: timed out")
    assert replies[4].startswith("250 2.0.0 <bob@example.test> delivered")
    for name, recipient in (("alice", "alice@example.test"), ("bob", "bob@example.test")):
        (stored,) = delivered(boxes[name])
        head, body = stored.split(b"\n", 1)
        assert body == MESSAGE.replace(b"\r\n", b"\n")  # CRLF made LF, dots unstuffed
        record = json.loads(head)
        assert record["env"] == {"SENDER": "sender@example.org", "RECIPIENT": recipient,
                                 "LOCAL": name, "DOMAIN": "example.test",
                                 "ORIGINAL_RECIPIENT": recipient, "USER": None}
        assert record["argv"] == [name, str(boxes[name])]
    log = front.log
    assert "from=<sender@example.org>" in log and "nrcpt=5" in log
    assert "to=<alice@example.test>" in log and "status=sent" in log
    assert "to=<perm@example.test>" in log and "status=bounced" in log
    assert "to=<slow@example.test>" in log and "outcome=timeout" in log


def test_supervisor_unreachable_defers_every_recipient(site):
    tmp_path, boxes = site
    front = start(tmp_path, supervisor="no-such-socket")
    try:
        client = Client(front.socket_path)
        client.command("LHLO mx.example.test")
        _, replies = client.transaction("s@example.org", ["alice@example.test",
                                                          "bob@example.test"], MESSAGE)
    finally:
        front.stop()
    assert len(replies) == 2
    assert all(r.startswith("451 4.3.0 compartment: cannot reach the daemon") for r in replies)
    assert not delivered(boxes["alice"]) and not delivered(boxes["bob"])


def test_null_sender_and_a_placeholder_that_is_not_one(site):
    tmp_path, boxes = site
    front = start(tmp_path, program=[PYTHON, "-c", AGENT, "{local}", "{mailbox}", "{nope}",
                                     "{sender}"])
    try:
        client = Client(front.socket_path)
        client.command("LHLO mx.example.test")
        _, replies = client.transaction("", ["alice@example.test"], MESSAGE)
    finally:
        front.stop()
    assert replies[0].startswith("250 ")
    record = json.loads(delivered(boxes["alice"])[0].split(b"\n", 1)[0])
    assert record["env"]["SENDER"] == ""
    assert record["argv"] == ["alice", str(boxes["alice"]), "{nope}", ""]


def test_limits_size_recipients_and_sessions(site):
    tmp_path, _ = site
    front = start(tmp_path, "--max-message-bytes", "1000", "--max-recipients", "2",
                  "--max-sessions", "2")
    try:
        client = Client(front.socket_path)
        lhlo = client.command("LHLO mx.example.test")
        assert any("SIZE 1000" in line for line in lhlo)
        assert client.command("MAIL FROM:<s@example.org> SIZE=5000")[0].startswith("552")
        assert client.command("MAIL FROM:<s@example.org>")[0].startswith("250")
        for _ in range(2):
            assert client.command("RCPT TO:<alice@example.test>")[0].startswith("250")
        assert client.command("RCPT TO:<bob@example.test>")[0].startswith("452 4.5.3")
        assert client.command("DATA")[0].startswith("354")
        client.send(b"x" * 500 + b"\r\n" + b"y" * 500 + b"\r\n.\r\n")
        assert client.reply()[0].startswith("552")  # too much data: one reply
        second = Client(front.socket_path)
        third = Client(front.socket_path)
        assert second.greeting[0].startswith("220")
        assert third.greeting[0].startswith("421 4.3.2")
        assert "refused a session" in front.log
    finally:
        front.stop()


def test_malformed_commands_get_5xx_and_the_session_goes_on(site):
    tmp_path, _ = site
    front = start(tmp_path)
    try:
        client = Client(front.socket_path)
        assert client.command("HELO x")[0].startswith("500")  # LMTP has LHLO only
        assert client.command("MAIL FROM:<a@b>")[0].startswith("503")  # before LHLO
        client.command("LHLO mx.example.test")
        for bad in ("MAIL FROM:<-oops@example.org>", "MAIL FROM:<a@b> BODY=9BIT",
                    "RCPT TO:<alice@example.test>", "DATA", "\x00\x01\x02", "MAIL",
                    "A" * 2000, "RCPT TO:<>"):
            assert client.command(bad)[0][0] == "5", bad
        client.send(b"\xff\xfe garbage\r\n")
        assert client.reply()[0][0] == "5"
        assert client.command("MAIL FROM:<a@example.org>")[0].startswith("250")
        assert client.command("RCPT TO:<-x@example.test>")[0].startswith("553")
        assert client.command("NOOP")[0].startswith("250")
    finally:
        assert front.stop() == 0


def test_idle_and_data_timeouts_close_the_session(site):
    tmp_path, _ = site
    front = start(tmp_path, "--idle-timeout-s", "1", "--data-timeout-s", "2")
    try:
        idle = Client(front.socket_path)
        idle.command("LHLO mx.example.test")
        time.sleep(1.5)
        with pytest.raises(ConnectionError):
            idle.command("NOOP")
        slow = Client(front.socket_path)
        slow.command("LHLO mx.example.test")
        slow.command("MAIL FROM:<a@example.org>")
        slow.command("RCPT TO:<alice@example.test>")
        slow.command("DATA")
        sent = 0
        with pytest.raises(OSError):  # a line every 0.8 s: never idle 1 s, but DATA is long
            for sent in range(1, 20):  # noqa: B007 - counted for the assertion below
                slow.send(b"a line\r\n")
                time.sleep(0.8)
        assert sent >= 3  # past the idle timeout: the DATA timeout (2 s) cut it
    finally:
        front.stop()


def test_sigterm_lets_the_delivery_in_hand_finish(site):
    tmp_path, boxes = site
    front = start(tmp_path)
    client = Client(front.socket_path)
    client.command("LHLO mx.example.test")
    client.command("MAIL FROM:<a@example.org>")
    client.command("RCPT TO:<alice@example.test>")
    client.command("DATA")
    idle = Client(front.socket_path)
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    time.sleep(0.3)  # the run has started
    front.signal(signal.SIGTERM)
    assert client.reply()[0].startswith("250 2.0.0")
    assert idle.reply()[0].startswith("421 4.3.2")
    assert front.process.wait(30) == 0
    assert len(delivered(boxes["alice"])) == 1
    assert not front.socket_path.exists() or not _connectable(front.socket_path)


def test_sighup_rereads_the_map(site):
    tmp_path, boxes = site
    front = start(tmp_path)
    try:
        client = Client(front.socket_path)
        client.command("LHLO mx.example.test")
        client.command("MAIL FROM:<a@example.org>")
        assert client.command("RCPT TO:<carol@example.test>")[0].startswith("550 5.1.1")
        with (tmp_path / "map").open("a") as entries:
            entries.write(f"carol@example.test {boxes['alice']}\n")
        front.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded" not in front.log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.command("RCPT TO:<carol@example.test>")[0].startswith("250")
        (tmp_path / "map").write_text("carol /not a path\n")
        front.signal(signal.SIGHUP)
        while "reload failed" not in front.log and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "map:1: '/not'" in front.log or "expected ADDRESS MAILBOX" in front.log
        assert client.command("RCPT TO:<carol@example.test>")[0].startswith("250")  # kept
    finally:
        front.stop()


def _connectable(path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def test_random_command_lines_get_a_reply_and_never_a_crash(site):
    """Whatever line arrives, a reply comes (2xx, or 5xx for what is malformed; aiosmtpd
    closes after five unknown commands with 502), and the front serves the next session."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tmp_path, _ = site
    front = start(tmp_path)
    state = {"client": None}

    def connected() -> Client:
        if state["client"] is None:
            state["client"] = Client(front.socket_path, timeout_s=10)
            state["client"].command("LHLO fuzz.example")
        return state["client"]

    lines = st.one_of(st.binary(max_size=700),
                      st.builds(lambda verb, rest: verb + b" " + rest,
                                st.sampled_from([b"MAIL FROM:", b"RCPT TO:", b"LHLO", b"VRFY",
                                                 b"NOOP", b"RSET", b"HELP", b"EXPN"]),
                                st.binary(max_size=300)))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(lines.map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
    def one(line: bytes) -> None:
        client = connected()
        client.send(line + b"\r\n")
        try:
            reply = client.reply()
        except ConnectionError:
            state["client"] = None  # closed after a 5xx goodbye: a new session next
            return
        code = reply[-1][:3]
        assert code[:1] in ("2", "5") or code in ("354", "421"), (line, reply)
        if code == "354":  # DATA got through (after a valid MAIL and RCPT): end it
            client.send(b".\r\n")
            client.reply()
        if code in ("221", "421") or reply[-1].startswith("502 5.5.1"):
            client.close()
            state["client"] = None

    try:
        one()
        assert front.process.poll() is None
        fresh = Client(front.socket_path)
        assert fresh.command("LHLO after.example")[-1].startswith("250")
        assert fresh.command("NOOP")[0].startswith("250")
    finally:
        assert front.stop() == 0

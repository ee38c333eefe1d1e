"""compartment milter, spoken to packet by packet as an MTA would, each filter run through the
stand-in for the resident supervisor's client (tests/fronts/standin.py)."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest

from compartment import milter_protocol as mp
from compartment.milter_protocol import Command, encode_command

from .harness import PYTHON, MilterClient, Running

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the stand-in for the supervisor "
                                "runs compartment.run as root, as the resident supervisor does")

ALL_ACTIONS, ALL_STEPS = 0x1FF, 0x1FFFFF
HEADERS = [("Received", " from client.example (client.example [192.0.2.1])\n\tby mx"),
           ("From", " a@example.org"), ("To", " b@example.test"), ("Subject", " hello")]
BODY = b"line one\r\nline two\r\n"
# What the filter sees on stdin: the headers as received, an empty line, the body, LF ends.
SEEN = (b"Received: from client.example (client.example [192.0.2.1])\n\tby mx\n"
        b"From: a@example.org\nTo: b@example.test\nSubject: hello\n\nline one\nline two\n")

ADD_TOP = "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(b'X-Top: 1\\n' + d)"
# spamassassin -L style: headers added at the end of the header section, body untouched.
ADD_END = ("import sys; d = sys.stdin.buffer.read(); h, b = d.split(b'\\n\\n', 1); "
           "sys.stdout.buffer.write(h + b'\\nX-Spam-Flag: NO\\nX-Spam-Score: 0.1\\n\\n' + b)")
REWRITE = ("import sys; d = sys.stdin.buffer.read(); h, b = d.split(b'\\n\\n', 1); "
           "h = h.replace(b'Subject: hello', b'Subject: [filtered] hello'); "
           "sys.stdout.buffer.write(h + b'\\n\\n' + b.upper())")
ECHO = "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"
REJECT = ("import sys; sys.stdin.buffer.read(); print('5.7.1 spam, go away', file=sys.stderr);"
          " sys.exit(77)")
SLOW = "import time; time.sleep(30)"


@pytest.fixture
def where(tmp_path):
    (tmp_path / "supervisor").write_text("")
    return tmp_path


def start(tmp_path, code, *options, supervisor="supervisor"):
    return Running("milter", tmp_path / "milter.sock",
                   ["--socket", str(tmp_path / supervisor), "--set", "limits.wall_timeout_s=5",
                    *options], [PYTHON, "-c", code], tmp_path / "front.log")


def conversation(front, headers=HEADERS, body=BODY, actions=ALL_ACTIONS, steps=ALL_STEPS,
                 mta="Sendmail 8.17"):
    """One message from negotiation to the end: (negotiated (actions, steps), final replies)."""
    client = MilterClient(front.socket_path)
    try:
        client.send(encode_command(Command(mp.OPTIONS, numbers=(6, actions, steps))))
        code, data = client.packet()
        assert code == b"O"
        _, agreed_actions, agreed_steps = struct.unpack("!III", data)
        client.send(encode_command(Command(mp.MACRO, stage=b"C", macros={"j": "mx", "v": mta})))
        for command in (Command(mp.CONNECT, args=("client.example", "4", "25", "192.0.2.1")),
                        Command(mp.HELO, args=("client.example",)),
                        Command(mp.MAIL, args=("<a@example.org>", "SIZE=100")),
                        Command(mp.RCPT, args=("<b@example.test>",))):
            client.send(encode_command(command))
        client.send(encode_command(Command(mp.MACRO, stage=b"E", macros={"i": "4QUEUEID"})))
        for name, value in headers:
            client.send(encode_command(Command(mp.HEADER, args=(name, value))))
        client.send(encode_command(Command(mp.END_OF_HEADERS)))
        client.send(encode_command(Command(mp.BODY, data=body)))
        assert client.packet() == (b"c", b"")  # the body chunk
        client.send(encode_command(Command(mp.END_OF_MESSAGE)))
        return (agreed_actions, agreed_steps), client.until_final()
    finally:
        client.close()


def converse(where, code, *options, supervisor="supervisor", **kwargs):
    """Start a front with filter `code`, one conversation, stop it: (negotiated, replies, log)."""
    front = start(where, code, *options, supervisor=supervisor)
    try:
        negotiated, replies = conversation(front, **kwargs)
    finally:
        front.stop()
    return negotiated, replies, front.log


def test_negotiation_asks_for_what_it_needs_and_no_more(where):
    (actions, steps), replies, log = converse(where, ECHO, "--rewrite")
    assert actions == mp.ADD_HEADERS | mp.CHANGE_HEADERS | mp.CHANGE_BODY
    assert steps & mp.HEADER_LEADING_SPACE and steps & mp.NR_HEADER
    assert not steps & mp.NO_HEADERS and not steps & mp.NO_BODY
    assert replies == [(b"c", b"")]  # the filter changed nothing: no edit at all


def test_without_rewrite_the_milter_asks_for_no_action(where):
    (actions, _), replies, log = converse(where, ADD_TOP)
    assert actions == 0 and replies == [(b"c", b"")]


def test_header_on_top_is_inserted_at_zero(where):
    _, replies, log = converse(where, ADD_TOP, "--rewrite")
    assert replies == [(b"i", struct.pack("!I", 0) + b"X-Top\0 1\0"), (b"c", b"")]
    assert "action=accept" in log and "4QUEUEID" in log


def test_under_postfix_an_insertion_counts_its_unseen_received_header(where):
    _, replies, log = converse(where, ADD_TOP, "--rewrite", mta="Postfix 3.7.11")
    assert replies == [(b"i", struct.pack("!I", 1) + b"X-Top\0 1\0"), (b"c", b"")]


def test_header_only_filter_adds_headers_without_a_body(where):
    _, replies, log = converse(where, ADD_END, "--rewrite")
    assert replies == [(b"h", b"X-Spam-Flag\0 NO\0"), (b"h", b"X-Spam-Score\0 0.1\0"),
                       (b"c", b"")]


def test_changed_header_and_body(where):
    _, replies, log = converse(where, REWRITE, "--rewrite")
    assert replies == [(b"m", struct.pack("!I", 1) + b"Subject\0 [filtered] hello\0"),
                       (b"b", b"LINE ONE\r\nLINE TWO\r\n"), (b"c", b"")]


def test_body_change_the_mta_did_not_allow_tempfails(where):
    _, replies, _ = converse(where, REWRITE, "--rewrite",
                             actions=mp.ADD_HEADERS | mp.CHANGE_HEADERS)
    (code, data), = replies
    assert code == b"y" and data.startswith(b"451 4.3.0 the filter changed the body")


def test_the_filter_sees_headers_as_received_then_the_body(where):
    (where / "out").mkdir()
    os.chown(where / "out", 65534, 65534)
    out = where / "out" / "seen"
    code = f"import sys; open({str(out)!r}, 'wb').write(sys.stdin.buffer.read())"
    front = start(where, code, "-p", "deliver", "--set", f"filesystem.writable={out.parent}")
    try:
        conversation(front)
    finally:
        front.stop()
    assert out.read_bytes() == SEEN


def test_permanent_verdict_rejects_with_the_filters_words(where):
    _, replies, log = converse(where, REJECT, "--rewrite")
    assert replies == [(b"y", b"550 5.7.1 spam, go away\0")]
    assert "action=reject" in log


def test_timeout_tempfails(where):
    _, replies, log = converse(where, SLOW)
    (code, data), = replies
    assert code == b"y" and data.startswith(b"451 4.4.7 compartment: timed out")


def test_supervisor_down_tempfails(where):
    _, replies, log = converse(where, ECHO, supervisor="no-such-socket")
    (code, data), = replies
    assert code == b"y" and data.startswith(b"451 4.3.0 compartment: cannot reach the daemon")


def test_on_failure_pass_lets_the_message_through_unchanged(where):
    _, replies, log = converse(where, SLOW, "--rewrite", "--set", "filter.on_failure=pass")
    assert replies == [(b"c", b"")]
    assert "action=pass-unfiltered" in log


@pytest.mark.parametrize("garbage", [
    b"\0\0\0\0",                               # a packet of no bytes
    b"\xff\xff\xff\xff",                       # a length past any limit
    struct.pack("!I", 1) + b"Z",               # an unknown command
    struct.pack("!I", 4) + b"L" + b"abc",      # a header without its NULs
    struct.pack("!I", 5) + b"O" + b"\0\0\0\6",  # a short option negotiation
])
def test_malformed_packets_end_that_session_only(where, garbage):
    front = start(where, ECHO)
    try:
        bad = MilterClient(front.socket_path)
        bad.send(garbage)
        with pytest.raises(ConnectionError):
            bad.packet()
        _, replies = conversation(front)  # the next connection is served as ever
        assert replies == [(b"c", b"")]
        assert "protocol error" in front.log
    finally:
        front.stop()


@pytest.mark.skipif(not os.path.exists("/usr/bin/spamassassin"),
                    reason="SpamAssassin is not installed (apt-get install spamassassin)")
def test_spamassassin_adds_its_headers_and_sends_no_body(where):
    """The real header-only filter: spamassassin -L with report_safe 0, its shipped profile."""
    front = Running("milter", where / "milter.sock",
                    ["--socket", str(where / "supervisor"), "-p", "spamassassin", "--rewrite"],
                    ["/usr/bin/spamassassin", "-L", "--cf=report_safe 0"], where / "front.log")
    try:
        _, replies = conversation(front)
    finally:
        front.stop()
    codes = [code for code, _ in replies]
    assert codes[-1] == b"c" and b"b" not in codes and b"m" not in codes, (replies, front.log)
    added = [data.split(b"\0")[-3 if code == b"i" else 0] for code, data in replies[:-1]]
    assert any(name.endswith(b"X-Spam-Status") for name in added), replies


def test_commands_in_any_order_never_crash_the_front(where):
    """Valid packets in any order (a header before negotiation, an end of message without a
    message, a body after an abort...): each session answers or ends, none raises inside the
    front, and the front serves a proper conversation afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from .test_milter_protocol import commands

    front = start(where, ECHO, "--rewrite")

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(commands(), max_size=12))
    def one(sequence) -> None:
        client = MilterClient(front.socket_path, timeout_s=0.3)
        # whatever it answers, until it waits for more (a timeout) or ends the session
        with contextlib.suppress(OSError):
            client.send(b"".join(encode_command(c) for c in sequence))
            while True:
                client.packet()
        client.close()

    try:
        one()
        assert front.process.poll() is None
        _, replies = conversation(front)
        assert replies == [(b"c", b"")]
    finally:
        front.stop()
    assert "Traceback" not in front.log and "exception" not in front.log.lower(), front.log


def test_too_big_is_refused_at_the_first_command_that_waits_for_a_reply(where):
    """Headers past --max-message-bytes get no reply (the MTA negotiated none for them); the
    body chunk, which waits for one, gets 552, and the end of message too, without a run."""
    front = start(where, ECHO, "--max-message-bytes", "100")
    client = MilterClient(front.socket_path)
    try:
        client.send(encode_command(Command(mp.OPTIONS, numbers=(6, ALL_ACTIONS, ALL_STEPS))))
        assert client.packet()[0] == b"O"
        client.send(encode_command(Command(mp.MAIL, args=("<a@example.org>",))))
        for _ in range(5):
            client.send(encode_command(Command(mp.HEADER, args=("X-Long", " " + "y" * 40))))
        client.send(encode_command(Command(mp.END_OF_HEADERS)))
        client.send(encode_command(Command(mp.BODY, data=BODY)))
        assert client.packet() == (b"y", b"552 5.3.4 message too big for the filter\0")
        client.send(encode_command(Command(mp.END_OF_MESSAGE)))
        assert client.until_final() == [(b"y", b"552 5.3.4 message too big for the filter\0")]
    finally:
        client.close()
        front.stop()
    assert "outcome=" not in front.log  # no filter ran

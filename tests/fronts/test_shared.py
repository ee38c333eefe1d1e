"""What the fronts share, without a front: the reply a Result stands for (one row per kind of
outcome), the recipients' lookup, the placeholders, the --listen forms and their errors."""

from __future__ import annotations

import os
import pwd

import pytest

from compartment.exits import Outcome, Verdict
from compartment.fronts import (
    FrontError,
    Listen,
    check_templates,
    expand,
    parse_listen,
    reply_for,
)
from compartment.recipients import Lookup
from compartment.report import Result


def _result(outcome: Outcome, status: int) -> Result:
    return Result(outcome=outcome, exit_status=status, reason="why", policy="p", program="x",
                  argv=("x",), wall_s=0.0)


@pytest.mark.parametrize(("outcome", "status", "said", "expected"), [
    (Outcome.OK, 0, "", "250 2.0.0 delivered"),
    (Outcome.AGENT_FAILED, 67, "", "550 5.1.1 no such user"),
    (Outcome.AGENT_FAILED, 77, "5.7.1 go away", "550 5.7.1 go away"),
    (Outcome.AGENT_FAILED, 65, "4.2.0 not a permanent code", "554 5.6.0 message data refused"),
    (Outcome.AGENT_FAILED, 75, "4.2.1 mailbox busy", "451 4.2.1 mailbox busy"),
    (Outcome.AGENT_FAILED, 75, "5.1.1 a permanent code on a temporary status",
     "451 4.3.0 5.1.1 a permanent code on a temporary status"),
    (Outcome.TIMEOUT, 75, "4.4.7 compartment: timed out", "451 4.4.7 compartment: timed out"),
    (Outcome.VIOLATION, 77, "5.7.0 compartment: seccomp", "550 5.7.0 compartment: seccomp"),
    (Outcome.INTERNAL_ERROR, 75, "", "451 4.3.0 why"),
    (Outcome.CONFIG_ERROR, 0, "", "451 4.3.0 why"),  # success only with the ok outcome
])
def test_reply_for_each_kind_of_run(outcome, status, said, expected):
    assert str(reply_for(_result(outcome, status), said)) == expected


def test_only_the_contracts_permanent_statuses_are_5xx():
    for status in range(256):
        reply = reply_for(_result(Outcome.AGENT_FAILED, status), "")
        permanent = status in (65, 67, 68, 69, 77)
        assert (reply.kind is Verdict.PERMANENT) == permanent, status
        assert reply.code.startswith("5" if permanent else "4"), status


def test_map_lookup_with_extension_and_errors(tmp_path):
    table = tmp_path / "map"
    table.write_text("# comment\nalice@example.test /srv/mail/alice\nbob /srv/mail/bob\n")
    lookup = Lookup(f"map:{table}", delimiter="+")
    found = lookup.find("Alice+lists@Example.test")
    assert found and found.mailbox == "/srv/mail/alice" and found.extension == "lists"
    assert found.address == "Alice+lists@Example.test" and found.local == "Alice+lists"
    assert lookup.find("bob@anywhere.example").mailbox == "/srv/mail/bob"
    assert lookup.find("carol@example.test") is None and lookup.find("@example.test") is None
    for text, message in (("a b c\n", "map:1: expected ADDRESS MAILBOX"),
                          ("a relative/path\n", "map:1: 'relative/path': expected an absolute"),
                          ("a /x,y\n", "map:1: '/x,y': expected an absolute")):
        table.write_text(text)
        with pytest.raises(FrontError, match=message.replace("map:", f"{table}:")):
            lookup.reload()
    with pytest.raises(FrontError, match="expected passwd"):
        Lookup("ldap:x")


def test_passwd_lookup_keeps_system_accounts_out():
    root = pwd.getpwuid(0).pw_name
    assert Lookup("passwd").find(f"{root}@example.test") is None  # uid 0 < 1000
    found = Lookup("passwd", min_uid=0).find(f"{root}@example.test")
    assert found and found.mailbox == os.path.normpath(pwd.getpwuid(0).pw_dir + "/Maildir")
    assert found.user == root
    assert Lookup("passwd").find("no-such-user-here@example.test") is None


def test_placeholders_are_replaced_once_and_only_known_ones():
    values = {"local": "{mailbox}", "mailbox": "/m"}
    assert expand("{local}-{mailbox}-{nope}", values) == "{mailbox}-/m-{nope}"
    check_templates(["x", "{local}"], ["filesystem.writable={mailbox}"])
    with pytest.raises(FrontError, match="only {mailbox} may appear"):
        check_templates(["x"], ["environment.set.X={sender}"])


@pytest.mark.parametrize(("text", "milter", "expected"), [
    ("unix:/run/x.sock", False, Listen("unix", path="/run/x.sock")),
    ("127.0.0.1:24", False, Listen("inet", host="127.0.0.1", port=24)),
    ("[::1]:24", False, Listen("inet", host="::1", port=24)),
    ("inet:8891@127.0.0.1", True, Listen("inet", host="127.0.0.1", port=8891)),
    ("local:/run/m.sock", True, Listen("unix", path="/run/m.sock")),
    ("systemd", True, Listen("systemd")),
])
def test_listen_forms(text, milter, expected):
    assert parse_listen(text, milter) == expected


@pytest.mark.parametrize(("text", "milter", "message"), [
    ("unix:relative", False, "expected unix:/PATH, HOST:PORT or systemd"),
    ("inet:99999@h", True, "'99999' is not a port number"),
    ("localhost:smtp", False, "'smtp' is not a port number"),
    ("8891@127.0.0.1", True, "expected unix:/PATH, inet:PORT@HOST"),
])
def test_listen_errors(text, milter, message):
    with pytest.raises(FrontError, match=message):
        parse_listen(text, milter)


def test_command_statuses(tmp_path, capsys):
    from compartment.front_command import main

    assert main(["lmtp", "--", "/bin/true"]) == 64  # --listen is required
    assert "the following arguments are required: --listen" in capsys.readouterr().err
    assert main(["milter", "--listen", "inet:1@h"]) == 64  # no FILTER
    assert main(["lmtp", "--help"]) == 0
    if os.geteuid() == 0:
        assert main(["lmtp", "--listen", f"unix:{tmp_path}/s", "--", "/bin/true"]) == 77
        assert "refusing to run as root" in capsys.readouterr().err
    assert main(["milter", "--listen", f"unix:{tmp_path}/s", "-p", "no-such-policy", "--",
                 "/bin/true"], allow_root=True) == 78
    assert "compartment milter: policy: " in capsys.readouterr().err
    assert main(["milter", "--listen", f"unix:{tmp_path}/s", "--", "/bin/x", "{local}"],
                allow_root=True) == 78
    assert not (tmp_path / "s").exists()

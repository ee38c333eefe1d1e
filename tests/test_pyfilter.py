"""compartment pyfilter and the Python examples (examples/python/), each run in the prison."""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import socket
import subprocess
import sys
from email.message import EmailMessage

import pytest

from compartment import Failed, Outcome, isolate
from examples.python import attachment_stripper, header_rewriter, smtp_filter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs prisons as root (as CI does); "
                                "the unprivileged mode has its own test in test_isolate.py")
CLI = [sys.executable, "-m", "compartment", "pyfilter"]
TESTS = os.path.dirname(os.path.abspath(__file__))
STRIP = "examples.python.attachment_stripper:strip"


def sample(attachment_bytes: int = 10 << 10) -> bytes:
    """A message with forged spam headers, a second Subject and an attachment."""
    message = EmailMessage()
    message["From"] = "alice@example.org"
    message["To"] = "bob@example.org"
    message["Subject"] = "the report"
    message["X-Spam-Status"] = "No, forged by the sender"
    message.set_content("Hello Bob,\n\nthe report is attached.\n")
    message.add_attachment(os.urandom(attachment_bytes), maintype="application",
                           subtype="octet-stream", filename="report.bin")
    data = message.as_bytes(policy=email.policy.SMTP)
    return data.replace(b"Subject: the report\r\n",
                        b"Subject: the report\r\nSubject: a second subject\r\n", 1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def pyfilter(args, message=None, **kwargs):
    return subprocess.run([*CLI, *args], input=sample() if message is None else message,
                          capture_output=True, **kwargs)


def test_header_rewriter_in_the_prison():
    with isolate(header_rewriter.rewrite) as rewrite:
        new = parse(rewrite(sample()))
    assert "X-Spam-Status" not in new
    assert new.get_all("Subject") == ["the report"]
    assert new["X-Filtered"] == "compartment.isolate header_rewriter"
    assert [part.get_filename() for part in new.iter_attachments()] == ["report.bin"]


def test_attachment_stripper_in_the_prison():
    with isolate(attachment_stripper.strip) as strip:
        new = parse(strip(sample(100 << 10)))
    assert new["X-Attachments-Removed"] == "1"
    notes = [part.get_content().replace("\r\n", "\n") for part in new.walk()
             if not part.is_multipart()]
    assert notes[0] == "Hello Bob,\n\nthe report is attached.\n"
    assert notes[1] == "[attachment 'report.bin' (application/octet-stream, 102400 bytes) " \
        "removed]\n"


def test_a_lazy_import_in_the_prison_is_a_violation():
    """What the examples avoid by importing at module level: the prison opens no file."""
    with isolate("prison_probes:lazy_import") as function, pytest.raises(Failed) as caught:
        function(b"")
    assert caught.value.outcome is Outcome.VIOLATION
    assert caught.value.denied_syscall in ("newfstatat", "openat", "getcwd")


def test_pyfilter_writes_the_new_message_to_stdout():
    done = pyfilter([STRIP])
    assert done.returncode == 0, done.stderr
    assert parse(done.stdout)["X-Attachments-Removed"] == "1"


def test_pyfilter_output_file_is_whole_or_absent(tmp_path):
    out = tmp_path / "new.eml"
    assert pyfilter(["--output", str(out), STRIP]).returncode == 0
    assert parse(out.read_bytes())["X-Attachments-Removed"] == "1"
    out.unlink()
    failed = pyfilter(["--output", str(out), "prison_probes:open_file"], cwd=TESTS)
    assert failed.returncode == 75 and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_pyfilter_reinjects_with_an_argv_list(tmp_path):
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/argv\n"
                        f"cat > {tmp_path}/stdin\n")
    sendmail.chmod(0o755)
    done = pyfilter(["--reinject", "a@example.org", "b@example.net", "--sendmail",
                     str(sendmail), "--", STRIP])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "argv").read_text().splitlines() == [
        "-G", "-i", "-f", "a@example.org", "--", "b@example.net"]
    assert parse((tmp_path / "stdin").read_bytes())["X-Attachments-Removed"] == "1"


@pytest.mark.parametrize(("args", "status", "line"), [
    (["examples.python.no_such:strip"], 75, b"4.3.5 compartment: the zygote cannot import "),
    (["--exit-codes", "qmail", "examples.python.no_such:strip"], 111,
     b"compartment: the zygote cannot import "),
    (["--set", "limits.memory_bytes=1M", STRIP], 75, b"4.3.5 compartment: limits.memory_bytes"),
    (["-p", "filter", STRIP], 75, b"4.3.5 compartment: "),
    (["examples.python.attachment_stripper"], 75, b"4.3.5 compartment: isolate(): "),
    ([], 75, b"4.3.5 compartment pyfilter: give one MODULE:FUNCTION"),
])
def test_pyfilter_failures_keep_the_message(args, status, line):
    done = pyfilter(args)
    assert (done.returncode, done.stdout) == (status, b"")
    assert done.stderr.startswith(line), done.stderr


def test_pyfilter_violation_is_a_temporary_failure_unless_the_policy_says():
    done = pyfilter(["prison_probes:make_socket"], cwd=TESTS)  # -m: the module path has cwd
    assert done.returncode == 75
    assert done.stderr == b"4.7.0 compartment: seccomp violation: socket is not allowed\n"
    bounced = pyfilter(["--set", "exit.violation=permanent", "prison_probes:make_socket"],
                       cwd=TESTS)
    assert bounced.returncode == 77
    assert bounced.stderr.startswith(b"5.7.0 compartment: seccomp violation")


def test_pyfilter_on_failure_pass_hands_on_the_original(tmp_path):
    out = tmp_path / "new.eml"
    done = pyfilter(["--set", "filter.on_failure=pass", "--set", "limits.memory_bytes=64M",
                     "--output", str(out), "examples.python.no_such:strip"], message=b"orig\n")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"orig\n"


def test_smtp_handler_strips_in_the_prison_and_defers_on_failure(tmp_path):
    maildir = str(tmp_path / "Maildir")
    with isolate(attachment_stripper.strip) as strip, \
            isolate("prison_probes:make_socket") as broken:
        port = free_port()
        controller = smtp_filter.serve(strip, maildir, port)
        try:
            with smtplib.SMTP("127.0.0.1", port) as client:
                client.sendmail("alice@example.org", ["bob@example.org"], sample())
            (delivered,) = os.listdir(os.path.join(maildir, "new"))
            with open(os.path.join(maildir, "new", delivered), "rb") as file:
                assert parse(file.read())["X-Attachments-Removed"] == "1"
            controller.handler.function = broken
            with smtplib.SMTP("127.0.0.1", port) as client, \
                    pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("alice@example.org", ["bob@example.org"], sample())
            assert refused.value.smtp_code == 451
            assert b"violation: seccomp violation: socket" in refused.value.smtp_error
        finally:
            controller.stop()
    assert len(os.listdir(os.path.join(maildir, "new"))) == 1

"""examples/procmail/procmailrc and examples/maildrop/mailfilter, run by the real programs.

Each rc file is installed with this site's paths (the compartment under test, the agents
directory) in PIPE_USER's home, which the password file says is SITE, so $HOME/Maildir is
MAILDIR.  procmail and maildrop then run as that user with a message on stdin, exactly as an
MTA would start them, and run the confined filter and the confined delivery of the examples.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .corpus import CorpusMessage, corpus, split_trace_headers
from .debian import install_replacing, require_root_debian
from .mailsite import (
    AGENTS,
    MAILDIR,
    PIPE_USER,
    REPO,
    SENDER,
    SITE,
    check_pipe_user_can_run_compartment,
    compartment_command,
    exclusive_site,
    prepare_site,
    read_maildir,
    remove_site,
)

EXAMPLES = REPO / "examples"
ADDED_HEADER = b"X-Compartment-Filtered: add-header.sh\n"
EX_TEMPFAIL = 75


def install_example(example: Path, target: Path, filter_program: str = "add-header.sh") -> None:
    """Copy an rc file example, pointing it at this site's compartment and agents, owned by
    PIPE_USER (procmail and maildrop refuse rc files others could have written)."""
    text = example.read_text()
    for installed, here in (("/usr/local/bin/compartment", compartment_command()),
                            ("/usr/local/libexec/compartment/add-header.sh",
                             str(AGENTS / filter_program)),
                            ("/usr/local/libexec/compartment/", f"{AGENTS}/")):
        assert installed in text, f"{example} no longer uses {installed}"
        text = text.replace(installed, here)
    target.write_text(text)
    user = pwd.getpwnam(PIPE_USER)
    os.chown(target, user.pw_uid, user.pw_gid)
    target.chmod(0o600)


def run_as_user(argv: list[str], message: CorpusMessage) -> subprocess.CompletedProcess:
    user = pwd.getpwnam(PIPE_USER)
    env = {"PATH": "/usr/bin:/bin", "SENDER": SENDER, "RECIPIENT": message.recipient}
    return subprocess.run(argv, input=message.data, capture_output=True, cwd=SITE, env=env,
                          user=user.pw_uid, group=user.pw_gid, extra_groups=[], timeout=120,
                          check=False)


def delivered_copy(message: CorpusMessage, added: bytes = b"", procmail: bool = False) -> bytes:
    """The delivered message, checked to be `added` + the original (+ trace headers).

    procmail ends every message it passes on with an empty line (the mbox convention): that
    one extra newline is procmail's, not a change by compartment.  maildrop adds nothing.
    """
    delivered = read_maildir(MAILDIR)[message.marker]
    assert delivered.startswith(added)
    body = delivered[len(added):]
    if procmail:
        assert body.endswith(b"\n\n") and not message.data.endswith(b"\n\n")
        body = body[:-1]
    split_trace_headers(body, message.data)
    return delivered


@pytest.fixture(scope="module")
def site() -> Iterator[None]:
    require_root_debian()
    with exclusive_site():
        install_replacing(["procmail", "maildrop"], [], "")
        prepare_site()
        check_pipe_user_can_run_compartment()
        yield
        remove_site()


@pytest.fixture
def message() -> CorpusMessage:
    return corpus(uuid.uuid4().hex[:12], SENDER, "example.test")[4]  # nested MIME


def test_procmail_filters_then_delivers(site: None, message: CorpusMessage) -> None:
    install_example(EXAMPLES / "procmail" / "procmailrc", SITE / ".procmailrc")
    result = run_as_user(["procmail"], message)
    assert result.returncode == 0, result.stderr
    delivered_copy(message, added=ADDED_HEADER, procmail=True)


def test_procmail_keeps_unfiltered_text_when_filter_fails(site: None,
                                                          message: CorpusMessage) -> None:
    """The filter is stopped by compartment (seccomp violation): procmail's `w` flag sees the
    failure, keeps the original text, and the confined delivery stores it unchanged."""
    install_example(EXAMPLES / "procmail" / "procmailrc", SITE / ".procmailrc",
                    filter_program="socket_inet.py")
    result = run_as_user(["procmail"], message)
    assert result.returncode == 0, result.stderr
    delivered_copy(message, procmail=True)


def test_maildrop_filters_then_delivers(site: None, message: CorpusMessage) -> None:
    install_example(EXAMPLES / "maildrop" / "mailfilter", SITE / ".mailfilter")
    result = run_as_user(["maildrop", str(SITE / ".mailfilter")], message)
    assert result.returncode == 0, result.stderr
    delivered_copy(message, added=ADDED_HEADER)


def test_maildrop_tempfails_when_filter_fails(site: None, message: CorpusMessage) -> None:
    """xfilter through a filter that compartment stops: maildrop exits EX_TEMPFAIL, so the
    MTA keeps the message, and nothing is delivered."""
    install_example(EXAMPLES / "maildrop" / "mailfilter", SITE / ".mailfilter",
                    filter_program="socket_inet.py")
    result = run_as_user(["maildrop", str(SITE / ".mailfilter")], message)
    assert result.returncode == EX_TEMPFAIL, result.stderr
    assert message.marker not in read_maildir(MAILDIR)

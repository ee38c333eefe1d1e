"""Tests shared by every real-MTA module: each module imports them and provides an `mta` fixture.

The `mta` fixture is a driver (see MtaDriver) for an MTA already configured so that recipient
domain NAME.test goes to a pipe transport running `compartment run` with scenario NAME's agent
(mailsite.SCENARIOS), and sink.test goes to the sink Maildir.
"""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Protocol

import pytest

from .corpus import CorpusMessage, corpus, split_trace_headers
from .debian import require_root_debian
from .mailsite import (
    FAILING,
    MAILDIR,
    SENDER,
    Scenario,
    bounces_for,
    envelope_records,
    exclusive_site,
    read_maildir,
    report_records,
    wait_for,
)


@pytest.fixture(scope="module")
def site() -> Iterator[None]:
    """The test site, held by one MTA module at a time (they swap conflicting packages)."""
    require_root_debian()
    with exclusive_site():
        yield


SMTP_HOST = "127.0.0.1"
SMTP_PORT = 25


class MtaDriver(Protocol):
    name: str
    envelope_via: str  # "argv" (Postfix pipe macros) or "environment" (Exim)
    unwanted_variable: str  # set by the MTA for the command, not passed by the policy
    added_headers: frozenset[str]  # non-trace fields the MTA itself puts on top (lower-case)

    def sendmail_argv(self, recipient: str) -> list[str]:
        """The MTA's sendmail command line for local submission to `recipient`."""
        ...

    def deferred_reason(self, recipient: str) -> str | None:
        """The MTA's reason when `recipient` waits in its queue after a failed attempt."""
        ...

    def queued(self, recipient: str) -> bool:
        """Whether any message for `recipient` is still in the queue."""
        ...


def submit_sendmail(mta: MtaDriver, message: CorpusMessage) -> None:
    result = subprocess.run(mta.sendmail_argv(message.recipient), input=message.data,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, f"sendmail failed: {result.stderr!r}"


def submit_smtp(message: CorpusMessage, port: int = SMTP_PORT) -> None:
    options = ["BODY=8BITMIME"] if message.eight_bit else []
    # smtplib sends bytes as given (no LF to CRLF conversion) and appends CRLF to a message
    # that does not end in one: convert here, or the MTA stores an extra empty line.
    wire = message.data.replace(b"\n", b"\r\n")
    with smtplib.SMTP(SMTP_HOST, port, timeout=60) as smtp:
        smtp.sendmail(SENDER, [message.recipient], wire, mail_options=options)


def smtp_ready(port: int = SMTP_PORT) -> bool:
    """Whether an SMTP server greets on SMTP_HOST:port."""
    try:
        with socket.create_connection((SMTP_HOST, port), timeout=2) as conn:
            return conn.recv(512).startswith(b"220")
    except OSError:
        return False


def smtp_port_free() -> bool:
    """Whether nothing listens on SMTP_HOST:SMTP_PORT (the previous MTA has let go of it)."""
    try:
        socket.create_connection((SMTP_HOST, SMTP_PORT), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # a listener that does not answer yet is still a listener
    return False


def small_message(label: str, domain: str) -> CorpusMessage:
    """A short text message to a fresh recipient LABEL-RANDOM@domain."""
    marker = f"{label}-{uuid.uuid4().hex[:12]}"
    recipient = f"{marker}@{domain}"
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = recipient
    msg["Subject"] = f"test {label}"
    msg["X-Compartment-Marker"] = marker
    msg.set_content(f"A message for the {label} test.\n")
    return CorpusMessage(marker, recipient, msg.as_bytes(), eight_bit=False)


def test_corpus_arrives_byte_exact(mta: MtaDriver) -> None:
    """Messages of varied size and MIME structure, one over 5 MB, half by SMTP and half by
    sendmail, reach the Maildir through compartment unchanged apart from trace headers."""
    messages = corpus(uuid.uuid4().hex[:12], SENDER, "deliver.test")
    for index, message in enumerate(messages):
        if index % 2:
            submit_smtp(message)
        else:
            submit_sendmail(mta, message)
    markers = {m.marker for m in messages}
    delivered = wait_for(
        lambda: (found := read_maildir(MAILDIR)) and markers <= found.keys() and found,
        f"{len(messages)} messages in {MAILDIR} via {mta.name}")
    for message in messages:
        split_trace_headers(delivered[message.marker], message.data, mta.added_headers)
        assert not mta.queued(message.recipient)


def test_envelope_reaches_agent(mta: MtaDriver) -> None:
    """The envelope reaches the agent the way this MTA passes it, and the MTA's other
    variables do not."""
    message = small_message("envelope", "envelope.test")
    submit_sendmail(mta, message)
    records = wait_for(
        lambda: [r for r in envelope_records(MAILDIR)
                 if message.recipient in json.dumps(r)], "the envelope agent's record")
    record = records[0]
    env = record["env"]
    if mta.envelope_via == "argv":
        assert record["args"] == [SENDER, message.recipient]
    else:
        assert env.get("SENDER") == SENDER
        assert env.get("RECIPIENT") == message.recipient.lower()
        assert env.get("DOMAIN") == "envelope.test"
    assert mta.unwanted_variable not in env
    assert env.get("PATH") == "/usr/bin:/bin"  # set by the policy, not inherited


@pytest.mark.parametrize("scenario", FAILING, ids=[s.name for s in FAILING])
def test_failing_agent(mta: MtaDriver, scenario: Scenario) -> None:
    """A runner-caused failure (timeout, seccomp violation, memory) leaves the message deferred
    in the MTA's queue; an agent's permanent status (77) bounces it to the sender."""
    message = small_message(scenario.name, scenario.domain)
    before = len(report_records(scenario))
    submit_sendmail(mta, message)
    if scenario.expect == "deferred":
        reason = wait_for(lambda: mta.deferred_reason(message.recipient),
                          f"{message.recipient} deferred in the {mta.name} queue")
        assert not bounces_for(message.recipient), f"{mta.name} bounced it: {reason}"
        if scenario.outcomes <= {"timeout", "violation"}:
            # compartment's own "4.x.x compartment: reason" line reaches the MTA's record.
            assert "compartment: " in reason, reason
    else:
        wait_for(lambda: bounces_for(message.recipient),
                 f"a bounce for {message.recipient} in the sink Maildir")
        wait_for(lambda: not mta.queued(message.recipient), "the bounced message to leave")
    assert message.marker not in read_maildir(MAILDIR)
    # compartment appends its record before it exits, so it is there once the MTA has acted.
    records = wait_for(lambda: report_records(scenario)[before:], f"a record in {scenario.report}",
                       timeout_s=5)
    assert records[-1]["outcome"] in scenario.outcomes, records[-1]

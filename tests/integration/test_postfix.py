"""compartment under a real Postfix (Debian's postfix package) on loopback.

The fixture installs Postfix (removing Exim, which conflicts with it), configures it with
postconf only, and starts it.  Each scenario domain NAME.test is routed by a transport map to a
pipe(8) service `ct-NAME` that runs `compartment run ... -- agent` as an unprivileged user.
The shared tests (mta_cases) then check what Postfix does with each outcome.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .corpus import corpus, split_trace_headers
from .debian import install_replacing, require_root_debian
from .mailsite import (
    AGENTS,
    MAILDIR,
    MTA_TIME_LIMIT_S,
    PIPE_USER,
    REPO,
    SCENARIOS,
    SENDER,
    SITE,
    check_pipe_user_can_run_compartment,
    compartment_argv,
    compartment_command,
    prepare_site,
    read_maildir,
    remove_site,
    run_checked,
    sink_argv,
    wait_for,
)
from .mta_cases import (
    site,
    small_message,
    smtp_port_free,
    smtp_ready,
    submit_sendmail,
    submit_smtp,
    test_corpus_arrives_byte_exact,
    test_envelope_reaches_agent,
    test_failing_agent,
)

pytestmark = pytest.mark.mta
# Imported so that pytest finds them here: the shared cases and the site fixture.
__all__ = ["site", "test_corpus_arrives_byte_exact", "test_envelope_reaches_agent",
           "test_failing_agent"]

PRESEED = ("postfix postfix/main_mailer_type select No configuration\n"
           "postfix postfix/mailname string mx.compartment.test\n")
CONFLICTING = ["exim4-daemon-light", "exim4-daemon-heavy", "exim4-base", "exim4-config",
               "opensmtpd"]
LOG_FILE = SITE / "postfix.log"
MAIN_CF = Path("/etc/postfix/main.cf")


def _service(scenario_name: str) -> str:
    return f"ct-{scenario_name}"


def _pipe_entry(service: str, argv: list[str]) -> str:
    # flags=R: prepend Return-Path, as a Maildir delivery does; user= is required and never
    # root.  The argv is passed to execvp() as is: no shell, no quoting.
    return f"{service} unix - n n - - pipe flags=R user={PIPE_USER} argv={' '.join(argv)}"


def _main_cf() -> list[str]:
    transports = [f"{s.domain}={_service(s.name)}:" for s in SCENARIOS]
    transports.append("sink.test=ct-sink:")
    domains = " ".join([s.domain for s in SCENARIOS] + ["sink.test"])
    settings = [
        "compatibility_level=3.6",
        "myhostname=mx.compartment.test",
        # local(8) delivers here with the example's mailbox_command.
        "mydestination=local.test",
        "inet_interfaces=loopback-only",
        "inet_protocols=ipv4",
        "mynetworks=127.0.0.0/8",
        f"relay_domains={domains}",
        f"transport_maps=inline:{{{', '.join(transports)}}}",
        "smtpd_relay_restrictions=permit_mynetworks, reject_unauth_destination",
        "alias_maps=",
        "alias_database=",
        "message_size_limit=52428800",
        "mailbox_size_limit=0",  # local(8) refuses a limit below message_size_limit
        # Keep deferred mail where the tests can see it: no retry during a test run.
        "minimal_backoff_time=3600s",
        "maximal_backoff_time=3600s",
        "queue_run_delay=3600s",
        f"maillog_file={LOG_FILE}",
    ]
    for service in [_service(s.name) for s in SCENARIOS] + ["ct-sink"]:
        # ${recipient} and ${sender} mean one recipient per delivery.
        settings.append(f"{service}_destination_recipient_limit=1")
        # Postfix bounces when its own limit fires, so compartment's must fire first.
        settings.append(f"{service}_time_limit={MTA_TIME_LIMIT_S}s")
    return settings


# The after-queue content filter of examples/postfix (spamassassin.master.cf), with this site's
# paths and other filters: mail submitted on FILTER_PORT goes through
# examples/agents/add-header.sh in a compartment and is re-injected by `compartment filter
# --reinject`; on FAILING_FILTER_PORT the "filter" is a hostile agent, and the original must
# stay in the queue.
FILTER_PORT = 10025
FAILING_FILTER_PORT = 10026
EXAMPLES = REPO / "examples"


def _content_filter_entry(service: str, program: Path) -> str:
    """The example's pipe entry, its argv cut at `--`, with this site's compartment and filter."""
    example = (EXAMPLES / "postfix" / "spamassassin.master.cf").read_text()
    fields = " ".join(line.strip() for line in example.splitlines()
                      if line.strip() and not line.startswith("#")).split()
    argv = fields[fields.index("argv=/usr/local/bin/compartment"):fields.index("--")]
    assert argv[1:4] == ["filter", "-p", "spamassassin"], argv
    assert "--reinject" in argv and {"flags=Rq", "user=filter", "null_sender="} <= set(fields)
    options = [o for o in argv[4:] if not o.startswith("/var/spool/") and o != "--report"]
    return (f"{service} unix - n n - 10 pipe flags=Rq user={PIPE_USER} null_sender= "
            f"argv={compartment_command()} filter -p filter {' '.join(options)} -- {program}")


def _configure_content_filters() -> None:
    filters = [("ct-filter", FILTER_PORT, AGENTS / "add-header.sh"),
               ("ct-filter-fail", FAILING_FILTER_PORT, AGENTS / "socket_inet.py")]
    for service, port, program in filters:
        run_checked(["postconf", "-M", f"{service}/unix=" + _content_filter_entry(service,
                                                                                  program)])
        run_checked(["postconf", "-M", f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - "
                     f"smtpd -o content_filter={service}:dummy"])
        run_checked(["postconf", "-e", f"{service}_time_limit={MTA_TIME_LIMIT_S}s"])


def _example_mailbox_command() -> str:
    """mailbox_command from examples/postfix/main.cf (as postconf reads it), with this
    site's paths.  local(8) runs it as PIPE_USER, whose $HOME/Maildir is MAILDIR."""
    with tempfile.TemporaryDirectory() as config:
        Path(config, "main.cf").write_text(
            (EXAMPLES / "postfix" / "mailbox-command.main.cf").read_text())
        command = run_checked(["postconf", "-c", config, "-h", "mailbox_command"]).stdout.strip()
    for installed, here in (("/usr/local/bin/compartment", compartment_command()),
                            ("/usr/local/libexec/compartment/", f"{AGENTS}/")):
        assert installed in command, f"the example's mailbox_command no longer uses {installed}"
        command = command.replace(installed, here)
    return command


def _configure() -> None:
    # Start from an empty main.cf (the "No configuration" package has none) so that each run
    # sees exactly these settings.
    MAIN_CF.write_text("# written by tests/integration/test_postfix.py\n")
    run_checked(["postconf", "-e", *_main_cf()])
    # Debian's master.cf chroots most services, which needs a copied /etc in the spool that
    # only Debian's init script makes; the tests start Postfix directly, without a chroot.
    run_checked(["postconf", "-F", "*/*/chroot=n"])
    for scenario in SCENARIOS:
        service = _service(scenario.name)
        # pipe(8) passes the envelope only as argv macros.
        envelope = ("${sender}", "${recipient}") if scenario.name == "envelope" else ()
        run_checked(["postconf", "-M", f"{service}/unix="
                     + _pipe_entry(service, compartment_argv(scenario, envelope))])
    run_checked(["postconf", "-M", "ct-sink/unix=" + _pipe_entry("ct-sink", sink_argv())])
    _configure_content_filters()
    run_checked(["postconf", "-e", f"mailbox_command={_example_mailbox_command()}"])


def _running() -> bool:
    return subprocess.run(["postfix", "status"], capture_output=True, check=False).returncode == 0


class PostfixDriver:
    name = "Postfix"
    envelope_via = "argv"
    added_headers: frozenset[str] = frozenset()
    # pipe(8) gives the command $export_environment (TZ MAIL_CONFIG LANG); MAIL_CONFIG is
    # set (postfix start exports it) and no policy passes it on.
    unwanted_variable = "MAIL_CONFIG"

    def sendmail_argv(self, recipient: str) -> list[str]:
        return ["/usr/sbin/sendmail", "-i", "-f", SENDER, "--", recipient]

    def _queue(self) -> list[dict[str, object]]:
        result = run_checked(["postqueue", "-j"])
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def _recipients(self, recipient: str) -> list[tuple[str, dict[str, str]]]:
        return [(str(entry["queue_name"]), rcpt) for entry in self._queue()
                for rcpt in entry["recipients"]  # type: ignore[attr-defined]
                if rcpt["address"].lower() == recipient.lower()]

    def deferred_reason(self, recipient: str) -> str | None:
        for queue_name, rcpt in self._recipients(recipient):
            if queue_name == "deferred" and rcpt.get("delay_reason"):
                return rcpt["delay_reason"]
        return None

    def queued(self, recipient: str) -> bool:
        return bool(self._recipients(recipient))


@pytest.fixture(scope="module")
def mta(site: None) -> Iterator[PostfixDriver]:
    require_root_debian()
    install_replacing(["postfix"], CONFLICTING, PRESEED)
    if _running():
        run_checked(["postfix", "stop"])
    wait_for(smtp_port_free, "port 25 to be free for Postfix", timeout_s=30)
    prepare_site()
    check_pipe_user_can_run_compartment()
    _configure()
    run_checked(["postfix", "check"])
    run_checked(["postfix", "start"])
    try:
        wait_for(smtp_ready, "Postfix to answer on 127.0.0.1:25", timeout_s=30)
        wait_for(lambda: smtp_ready(FILTER_PORT), "the content-filter smtpd", timeout_s=30)
        yield PostfixDriver()
    finally:
        subprocess.run(["postsuper", "-d", "ALL"], capture_output=True, check=False)
        subprocess.run(["postfix", "stop"], capture_output=True, check=False)
        wait_for(smtp_port_free, "Postfix to close port 25", timeout_s=30)
        remove_site()


def test_content_filter_reinjects_filtered_message(mta: PostfixDriver) -> None:
    """The example's `compartment filter --reinject` entry: the confined filter's output is
    re-injected with sendmail -G -i and delivered; the original is intact below the header."""
    message = corpus("filter", SENDER, "deliver.test")[2]  # multipart/alternative
    submit_smtp(message, port=FILTER_PORT)
    delivered = wait_for(lambda: read_maildir(MAILDIR).get(message.marker),
                         "the filtered message in the Maildir")
    assert delivered.endswith(message.data)
    prepended = delivered[: -len(message.data)]
    assert prepended.count(b"\nX-Compartment-Filtered: add-header.sh\n") == 1, prepended


def test_failing_content_filter_keeps_message_queued(mta: PostfixDriver) -> None:
    """A filter stopped by compartment (a seccomp violation) leaves the original deferred."""
    message = small_message("filter-fail", "deliver.test")
    submit_smtp(message, port=FAILING_FILTER_PORT)
    reason = wait_for(lambda: mta.deferred_reason(message.recipient),
                      "the message deferred by the failing filter")
    assert "compartment: " in reason
    assert message.marker not in read_maildir(MAILDIR)


def test_mailbox_command_delivers(mta: PostfixDriver) -> None:
    """The example's mailbox_command: local(8) runs it as the recipient, through /bin/sh,
    and the message lands in $HOME/Maildir."""
    message = corpus("mailbox", SENDER, "local.test")[1]  # 8-bit UTF-8 text
    message = dataclasses.replace(message, recipient=f"{PIPE_USER}@local.test")
    submit_sendmail(mta, message)
    delivered = wait_for(lambda: read_maildir(MAILDIR).get(message.marker),
                         "the message delivered by mailbox_command")
    split_trace_headers(delivered, message.data)


def test_examples_parse(mta: PostfixDriver, tmp_path: Path) -> None:
    """Each recipe's main.cf and master.cf pieces (added to Debian's master.cf) are read by
    postconf without a warning."""
    config = tmp_path / "postfix"
    shutil.copytree("/etc/postfix", config)
    pieces = sorted((EXAMPLES / "postfix").glob("*.cf"))
    (config / "main.cf").write_text("".join(p.read_text() for p in pieces
                                            if p.name.endswith(".main.cf")))
    with (config / "master.cf").open("a") as master:
        master.write("".join(p.read_text() for p in pieces if p.name.endswith(".master.cf")))
    for option in ("-n", "-M", "-P"):
        result = run_checked(["postconf", "-c", str(config), option])
        assert "warning" not in result.stderr, result.stderr
    entries = run_checked(["postconf", "-c", str(config), "-M"]).stdout
    assert "compartment-maildir unix" in entries and "compartment-spamassassin unix" in entries

"""compartment under a real OpenSMTPD (Debian's opensmtpd 6.8) on loopback.

The fixture installs OpenSMTPD (removing Postfix or Exim: all three provide
mail-transport-agent), writes a configuration in the form of examples/opensmtpd/smtpd.conf
(an `mda wrapper` that runs compartment around each delivery command, here one wrapper per
scenario so that each gets its own limits and report file), and runs smtpd in the foreground
(-d) as a child of the test.  The shared tests (mta_cases) then check what OpenSMTPD does with
each outcome.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .debian import install_replacing
from .mailsite import (
    AGENTS,
    MAILDIR,
    PIPE_USER,
    PYTHON,
    REPO,
    SCENARIOS,
    SENDER,
    SINK_MAILDIR,
    SITE,
    WALL_TIMEOUT_S,
    check_pipe_user_can_run_compartment,
    compartment_command,
    prepare_site,
    read_maildir,
    remove_site,
    report_records,
    run_checked,
    wait_for,
)
from .mta_cases import (
    site,
    small_message,
    smtp_port_free,
    smtp_ready,
    submit_sendmail,
    test_corpus_arrives_byte_exact,
    test_envelope_reaches_agent,
    test_failing_agent,
)

pytestmark = pytest.mark.mta
# Imported so that pytest finds them here: the shared cases and the site fixture.
__all__ = ["site", "test_corpus_arrives_byte_exact", "test_envelope_reaches_agent",
           "test_failing_agent"]

PRESEED = ("opensmtpd opensmtpd/mailname string mx.compartment.test\n"
           "opensmtpd opensmtpd/root_address string\n")
CONFLICTING = ["postfix", "exim4-daemon-light", "exim4-daemon-heavy", "exim4-base",
               "exim4-config"]
CONFIG = SITE / "smtpd.conf"
LOG_FILE = SITE / "smtpd.log"
SMTPCTL = "/usr/sbin/smtpctl"


def smtpd_config() -> str:
    """The test site in the example's form: wrapper + mda action per scenario domain.

    Every recipient of a scenario domain maps (virtual table, "@" catch-all) to PIPE_USER,
    who runs the delivery; %{mda} is the action's command, which OpenSMTPD 6.8 expands to
    `/usr/libexec/opensmtpd/mail.mda "COMMAND"` (mail.mda then runs COMMAND with /bin/sh,
    inside the compartment).
    """
    lines = [f'table vusers {{ "@" = "{PIPE_USER}" }}', "listen on 127.0.0.1 port 25", ""]
    for s in SCENARIOS:
        settings = "".join(f" --set {setting}" for setting in s.settings)
        lines.append(f'mda wrapper w_{s.name} "{compartment_command()} run -p deliver'
                     f" --set filesystem.writable={MAILDIR}"
                     f" --set limits.wall_timeout_s={WALL_TIMEOUT_S}{settings}"
                     f' --report {s.report} -- %{{mda}}"')
    for s in SCENARIOS:
        maildir = f" {MAILDIR}" if s.expect == "delivered" else ""
        lines.append(f'action "a_{s.name}" mda "{PYTHON} {AGENTS / s.agent}{maildir}"'
                     f" virtual <vusers> wrapper w_{s.name}")
        lines.append(f'match from local for domain "{s.domain}" action "a_{s.name}"')
    lines.append(f'action "a_sink" mda "{PYTHON} {AGENTS}/maildir-deliver.py {SINK_MAILDIR}"'
                 " virtual <vusers>")
    lines.append('match from local for domain "sink.test" action "a_sink"')
    return "\n".join(lines) + "\n"


class OpenSmtpdDriver:
    name = "OpenSMTPD"
    envelope_via = "environment"
    # OpenSMTPD's sendmail (smtpctl enqueue) adds Content-Disposition: inline on top of a
    # locally submitted message that has none (observed with 6.8).
    added_headers = frozenset({"content-disposition"})
    # smtpd sets SHELL=/bin/sh for the delivery command; the policy does not pass it.
    unwanted_variable = "SHELL"

    def sendmail_argv(self, recipient: str) -> list[str]:
        return ["/usr/sbin/sendmail", "-i", "-f", SENDER, "--", recipient]

    def _envelopes(self, recipient: str) -> list[list[str]]:
        # `smtpctl show queue`: evpid|type|agent|auth|sender|rcpt|dest|ctime|lasttry|
        # lastbounce|retry|state|expire|"last error"
        listing = run_checked([SMTPCTL, "show", "queue"]).stdout
        fields = [line.split("|", 13) for line in listing.splitlines()]
        return [f for f in fields if len(f) == 14 and f[5].lower() == recipient.lower()]

    def deferred_reason(self, recipient: str) -> str | None:
        for envelope in self._envelopes(recipient):
            if int(envelope[10]) > 0 and envelope[13].strip('"'):
                return envelope[13]
        return None

    def queued(self, recipient: str) -> bool:
        return bool(self._envelopes(recipient))


def _remove_all_envelopes() -> None:
    subprocess.run([SMTPCTL, "remove", "all"], capture_output=True, check=False)


@pytest.fixture(scope="module")
def mta(site: None) -> Iterator[OpenSmtpdDriver]:
    install_replacing(["opensmtpd"], CONFLICTING, PRESEED)
    wait_for(smtp_port_free, "port 25 to be free for OpenSMTPD", timeout_s=30)
    prepare_site()
    check_pipe_user_can_run_compartment()
    CONFIG.write_text(smtpd_config())
    run_checked(["smtpd", "-n", "-f", str(CONFIG)])
    _remove_all_envelopes()
    with LOG_FILE.open("w") as log:
        daemon = subprocess.Popen(["smtpd", "-d", "-f", str(CONFIG)], stdout=log, stderr=log)
    try:
        wait_for(smtp_ready, "OpenSMTPD to answer on 127.0.0.1:25", timeout_s=30)
        yield OpenSmtpdDriver()
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        _remove_all_envelopes()
        remove_site()


def test_example_config_is_valid(mta: OpenSmtpdDriver) -> None:
    """examples/opensmtpd/smtpd.conf passes smtpd's own check."""
    example = REPO / "examples" / "opensmtpd" / "smtpd.conf"
    result = run_checked(["smtpd", "-n", "-f", str(example)])
    assert "configuration OK" in result.stdout + result.stderr


def test_wrapper_runs_mail_mda_inside_compartment(mta: OpenSmtpdDriver) -> None:
    """What %{mda} became in the wrapper: compartment's report names OpenSMTPD's mail.mda
    helper as the confined program, with the action's command as its one argument."""
    [deliver] = [s for s in SCENARIOS if s.name == "deliver"]
    message = small_message("wrapper", deliver.domain)
    submit_sendmail(mta, message)
    wait_for(lambda: read_maildir(MAILDIR).get(message.marker), "the delivered message")
    record = report_records(deliver)[-1]
    assert Path(str(record["program"])).name == "mail.mda", record
    assert record["argv"][1:] == [f"{PYTHON} {AGENTS / deliver.agent} {MAILDIR}"], record

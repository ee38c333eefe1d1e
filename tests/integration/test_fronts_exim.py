"""compartment lmtp under a real Exim: its lmtp transport delivering one message to the
Maildirs of two users with mixed per-recipient outcomes, each checked in Exim's queue and main
log.  The front runs as its own uid, a client of a real `compartment serve`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .debian import install_replacing, require_root_debian
from .mailsite import (
    MTA_TIME_LIMIT_S,
    PIPE_USER,
    SENDER,
    SITE,
    bounces_for,
    prepare_site,
    remove_site,
    run_checked,
    sink_argv,
    wait_for,
)
from .mta_cases import site, smtp_port_free, smtp_ready
from .test_exim import (
    CONFIG,
    CONFLICTING,
    DEBIAN_PID_FILE,
    EXIM,
    MAIN_SECTION,
    MAINLOG,
    PID_FILE,
    PRESEED,
    RETRY_SECTION,
    ROUTER,
    TRANSPORT,
    _clear_queue,
    _stop_daemon,
)
from .test_fronts_postfix import (
    AGENT,
    LMTP_SOCKET,
    LMTP_UID,
    PYTHON,
    USERS,
    Front,
    _rules,
    _users,
    delivered,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
from serving import Daemon  # noqa: E402

pytestmark = pytest.mark.mta
__all__ = ["site"]

LMTP = f"""\
ct_lmtp:
  driver = lmtp
  socket = {LMTP_SOCKET}
  batch_max = 50
"""


def _config() -> str:
    parts = [MAIN_SECTION.format(domains="lmtp.test : sink.test"),
             ROUTER.format(name="lmtp", domain="lmtp.test"),
             ROUTER.format(name="sink", domain="sink.test"), "\nbegin transports\n", LMTP,
             TRANSPORT.format(name="sink", command=" ".join(sink_argv()), user=PIPE_USER,
                              timeout=MTA_TIME_LIMIT_S), RETRY_SECTION]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def exim(site: None) -> Iterator[dict[str, Path]]:
    require_root_debian()
    install_replacing(["exim4-daemon-light", "swaks"], CONFLICTING, PRESEED)
    _stop_daemon(DEBIAN_PID_FILE)
    wait_for(smtp_port_free, "port 25 to be free for Exim", timeout_s=30)
    prepare_site()
    maildirs = _users()
    CONFIG.write_text(_config())
    CONFIG.chmod(0o644)
    run_checked([EXIM, "-bV"])
    _clear_queue()
    daemon = Daemon(config=_rules()).start()
    front = Front("lmtp", LMTP_UID, LMTP_SOCKET,
                  ["--socket", daemon.socket, "--set", "limits.wall_timeout_s=5",
                   "--recipient-delimiter", "+", "--set", "filesystem.writable={mailbox}"],
                  [PYTHON, "-c", AGENT, "{mailbox}"], group="Debian-exim")
    run_checked([EXIM, "-bd", "-oP", str(PID_FILE)])
    try:
        wait_for(smtp_ready, "Exim to answer on 127.0.0.1:25", timeout_s=30)
        yield maildirs
    finally:
        _stop_daemon(PID_FILE)
        _clear_queue()
        front.stop()
        daemon.stop()
        CONFIG.unlink(missing_ok=True)
        remove_site()
        for user in USERS:
            subprocess.run(["userdel", user], capture_output=True, check=False)
        shutil.rmtree(SITE / "home", ignore_errors=True)


def _mainlog(pattern: str) -> list[str]:
    text = MAINLOG.read_text(errors="replace") if MAINLOG.exists() else ""
    return [line for line in text.splitlines() if re.search(pattern, line)]


def test_exim_lmtp_mixed_outcomes_per_recipient(exim: dict[str, Path]) -> None:
    marker = uuid.uuid4().hex[:12]
    alice, bob = (f"{u}@lmtp.test" for u in USERS)
    temp, perm, slow = "ct-alice+temp@lmtp.test", "ct-bob+perm@lmtp.test", \
        "ct-bob+slow@lmtp.test"
    sent = subprocess.run(["swaks", "--server", "127.0.0.1:25", "--from", SENDER, "--to",
                           ",".join([alice, temp, perm, slow, bob]), "--body",
                           f"marker {marker}\n"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    for user in USERS:
        (message,) = wait_for(lambda u=user: delivered(exim[u], marker), f"{user}'s copy")
        assert message.startswith(f"X-Envelope: {SENDER} {user}@lmtp.test\n".encode())
    wait_for(lambda: _mainlog(rf"== {re.escape(slow)} "), "the timeout deferred")
    for address in (alice, bob):
        assert _mainlog(rf"[=-]> \S+ <{re.escape(address)}> R=ct_lmtp T=ct_lmtp "
                        r'C="250 2\.0\.0 .* delivered in a compartment"')
    assert _mainlog(rf"== {re.escape(temp)} .*451 4\.2\.1 mailbox busy")
    assert _mainlog(rf"\*\* {re.escape(perm)} .*550 5\.1\.1 this mailbox is closed")
    assert _mainlog(rf"== {re.escape(slow)} .*451 4\.4\.7 compartment: timed out")
    def queue_kept_only_the_deferred() -> bool:
        lines = [line.strip() for line in run_checked([EXIM, "-bp"]).stdout.splitlines()]
        return {f"D {alice}", f"D {bob}", temp, slow} <= set(lines)

    wait_for(queue_kept_only_the_deferred, "Exim's queue: alice and bob done, two deferred")
    wait_for(lambda: bounces_for(perm), "the bounce for the permanent verdict")

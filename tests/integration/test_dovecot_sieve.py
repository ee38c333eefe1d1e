"""examples/dovecot: the Sieve extprograms configuration and shim, run by Dovecot's Sieve
interpreter (sieve-test from Debian's dovecot-sieve, which executes the actions for real).

The example configuration is included as it is; only sieve_filter_bin_dir points at a copy
of the shim that names this site's compartment and filter program.  sieve-test runs as
PIPE_USER and stores the result in a Maildir, as Dovecot's LDA would.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .corpus import corpus, split_trace_headers
from .debian import install_replacing, require_root_debian
from .mailsite import (
    AGENTS,
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

EXAMPLE = REPO / "examples" / "dovecot"
WORK = SITE / "dovecot"
ADDED_HEADER = b"X-Compartment-Filtered: add-header.sh\n"


def install_shim(filter_program: str) -> Path:
    """The example's shim with this site's paths, in a fresh bin dir; returns the config."""
    bin_dir = WORK / "sieve-filter"
    bin_dir.mkdir(parents=True, exist_ok=True)
    text = (EXAMPLE / "sieve-filter" / "add-header").read_text()
    for installed, here in (("/usr/local/bin/compartment", compartment_command()),
                            ("/usr/local/libexec/compartment/add-header.sh",
                             str(AGENTS / filter_program))):
        assert installed in text, f"the example shim no longer uses {installed}"
        text = text.replace(installed, here)
    (bin_dir / "add-header").write_text(text)
    (bin_dir / "add-header").chmod(0o755)
    config = WORK / "dovecot.conf"
    config.write_text(f"!include {EXAMPLE / '90-sieve-extprograms.conf'}\n"
                      f"plugin {{\n  sieve_filter_bin_dir = {bin_dir}\n}}\n")
    return config


def run_sieve(config: Path, message: bytes, maildir: Path) -> subprocess.CompletedProcess:
    """sieve-test with -e: execute the actions (the filter program, then store into INBOX)."""
    message_file = WORK / "message.eml"
    message_file.write_bytes(message)
    user = pwd.getpwnam(PIPE_USER)
    for path in [WORK, *WORK.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    argv = ["sieve-test", "-c", str(config), "-x", "+vnd.dovecot.filter", "-e", "-t", "-",
            "-l", f"maildir:{maildir}", str(EXAMPLE / "example.sieve"), str(message_file)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=WORK,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(WORK)}, user=user.pw_uid,
                          group=user.pw_gid, extra_groups=[], timeout=60, check=False)


@pytest.fixture(scope="module")
def site() -> Iterator[None]:
    require_root_debian()
    with exclusive_site():
        install_replacing(["dovecot-core", "dovecot-sieve"], [], "")
        prepare_site()
        check_pipe_user_can_run_compartment()
        yield
        remove_site()


def test_sieve_filter_runs_confined(site: None) -> None:
    message = corpus("sieve", SENDER, "example.test")[3]  # MIME with attachment
    maildir = WORK / "ok" / "Maildir"
    result = run_sieve(install_shim("add-header.sh"), message.data, maildir)
    assert result.returncode == 0, result.stderr
    assert "changed message" in result.stdout, result.stdout
    delivered = read_maildir(maildir)[message.marker]
    assert delivered.startswith(ADDED_HEADER)
    split_trace_headers(delivered[len(ADDED_HEADER):], message.data)


def test_failed_filter_keeps_original(site: None) -> None:
    """A filter that compartment stops (seccomp violation) is a false `filter` test in the
    example script: Sieve stores the original message unchanged."""
    message = corpus("sieve-fail", SENDER, "example.test")[0]
    maildir = WORK / "fail" / "Maildir"
    result = run_sieve(install_shim("socket_inet.py"), message.data, maildir)
    assert result.returncode == 0, result.stderr
    assert "compartment: seccomp violation" in result.stdout + result.stderr
    split_trace_headers(read_maildir(maildir)[message.marker], message.data)

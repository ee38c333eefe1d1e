"""The shipped filter profiles, each running its real Debian tool on real messages.

Every tool runs through the command line as the profile's first comment shows it (with the
test's own paths: `compartment filter|run -p NAME -- TOOL ...`), with a report to read the
outcome from.  Each profile also meets a program that tries more than the tool needs — the
tool itself asked to do more (spamassassin without -L, formail -s, ripmime into another
directory) or a small shell or Python agent — and the test checks that it is stopped: a
seccomp violation (75, 4.7.0), or a failing call (EROFS, ENOENT) that the agent reports and
compartment turns into 75.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import OWNER_UID, Corpus, Dkim

from compartment import Policy
from compartment.syscall_filter import compile_filter

pytestmark = pytest.mark.usefixtures("filter_packages")

REPO = Path(__file__).resolve().parents[2]
DKIMVERIFY_KEYFILE = str(REPO / "examples" / "agents" / "dkimverify-keyfile.py")
PROFILES = ["spamassassin", "formail", "reformail", "ripmime", "altermime", "mdeliver",
            "dkimverify", "clamscan"]
SPAMASSASSIN = [  # the profile's command
    "/usr/bin/spamassassin", "-L", "-x", "--cf=report_safe 0",
    "--cf=report_hostname mail.example.org"]
CLAMSCAN = ["/usr/bin/clamscan", "--no-summary"]
EX_TEMPFAIL, QMAIL_SOFT = 75, 111


@dataclass
class Confined:
    status: int
    stdout: bytes
    stderr: bytes
    report: dict


def confined(command: str, profile: str, argv: list[str], message: bytes, tmp_path: Path,
             *options: str) -> Confined:
    """`compartment COMMAND -p PROFILE [OPTIONS] -- ARGV` with MESSAGE on stdin."""
    report = tmp_path / f"report-{uuid.uuid4().hex}.json"
    done = subprocess.run([sys.executable, "-m", "compartment", command, "-p", profile,
                           "--report", str(report), *options, "--", *argv], input=message,
                          capture_output=True, timeout=180, check=False)
    return Confined(done.returncode, done.stdout, done.stderr,
                    json.loads(report.read_text().splitlines()[-1]))


def stopped(ran: Confined, syscall: str | tuple[str, ...], status: int = EX_TEMPFAIL) -> None:
    """Killed by the seccomp filter for `syscall`: a temporary failure, named in the report."""
    names = (syscall,) if isinstance(syscall, str) else syscall
    assert ran.report["outcome"] == "violation", (ran.report, ran.stderr)
    assert ran.report["denied_syscall"] in names and ran.status == status, ran.report
    if status == EX_TEMPFAIL:
        assert ran.stderr.startswith(b"4.7.0 compartment: seccomp violation")


def refused(ran: Confined, text: bytes) -> None:
    """The agent's call failed (read-only or absent here), it said so (on stdout or stderr:
    ripmime uses stdout) and exited non-zero, which compartment turns into 75."""
    assert ran.report["outcome"] == "agent-failed" and ran.status == EX_TEMPFAIL, ran.report
    assert text in ran.stdout + ran.stderr, (ran.stdout, ran.stderr)


def scratch(path: Path, *subdirs: str) -> Path:
    """A fresh directory owned by OWNER_UID (the uid an "owner" profile then runs as)."""
    path.mkdir()
    for name in subdirs:
        (path / name).mkdir()
    for each in (path, *(path / name for name in subdirs)):
        os.chown(each, OWNER_UID, OWNER_UID)
        each.chmod(0o700)
    return path


def shown(path: Path, mode: int = 0o755) -> Path:
    """A directory the compartment's uid can read (pytest's tmp_path is 0700)."""
    path.mkdir()
    path.chmod(mode)
    return path


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


def body_of(data: bytes) -> bytes:
    return data.split(b"\n\n", 1)[1]


# --- the profiles themselves -------------------------------------------------------------------

@pytest.mark.parametrize("name", PROFILES)
def test_profile_is_valid_and_opens_with_its_command(name):
    overrides = ["filesystem.writable=/srv/mail"] if name in ("ripmime", "mdeliver") else []
    policy = Policy.load(name, overrides)
    assert policy.description and not policy.environment.pass_
    assert len(compile_filter(policy.seccomp, policy.network).bpf) % 8 == 0
    text = (REPO / "policies" / f"{name}.toml").read_text()
    assert text.startswith("# compartment ") and f" -p {name} " in text.splitlines()[0]


# --- spamassassin -L -----------------------------------------------------------------------

def test_spamassassin_adds_its_headers_to_ham_and_spam(corpus: Corpus, tmp_path):
    ham = confined("filter", "spamassassin", SPAMASSASSIN, corpus.plain, tmp_path)
    assert ham.status == 0 and ham.report["outcome"] == "ok", ham.stderr
    assert ham.stderr == b""  # -x: no "created user preferences file" for Postfix to log
    assert ham.stdout.startswith(b"X-Spam-Checker-Version: SpamAssassin ")
    assert b" on mail.example.org\n" in ham.stdout and b"X-Spam-Status: No, " in ham.stdout
    assert ham.stdout.endswith(body_of(corpus.plain))

    spam = confined("filter", "spamassassin", SPAMASSASSIN, corpus.spam, tmp_path)
    assert spam.status == 0, spam.stderr
    headers = parse(spam.stdout)
    assert headers["X-Spam-Flag"] == "YES" and headers["X-Spam-Status"].startswith("Yes, ")
    assert "GTUBE" in headers["X-Spam-Status"]
    assert spam.stdout.endswith(body_of(corpus.spam))  # report_safe 0: headers only


def test_spamassassin_with_network_tests_is_stopped(corpus: Corpus, tmp_path):
    """Without -L spamassassin looks up DNS blocklists: its first socket is a violation."""
    argv = [a for a in SPAMASSASSIN if a != "-L"]
    stopped(confined("filter", "spamassassin", argv, corpus.plain, tmp_path), "socket")


# --- formail and reformail -----------------------------------------------------------------

EDITORS = {"formail": ["/usr/bin/formail", "-f", "-I", "Subject: edited", "-A",
                       "X-Filtered: formail"],
           "reformail": ["/usr/bin/reformail", "-I", "Subject: edited", "-A",
                         "X-Filtered: reformail"]}


@pytest.mark.parametrize("tool", sorted(EDITORS))
def test_header_editors_edit_headers_and_keep_the_body(tool, corpus: Corpus, tmp_path):
    ran = confined("filter", tool, EDITORS[tool], corpus.multipart, tmp_path)
    assert ran.status == 0 and ran.report["outcome"] == "ok", ran.stderr
    edited = parse(ran.stdout)
    assert edited.get_all("Subject") == ["edited"] and edited["X-Filtered"] == tool
    assert not ran.stdout.startswith(b"From ")  # formail -f: no mbox line added
    # formail ends the message with an empty line, as in an mbox; reformail adds nothing.
    ending = b"\n" if tool == "formail" else b""
    assert body_of(ran.stdout) == body_of(corpus.multipart) + ending


@pytest.mark.parametrize("tool", sorted(EDITORS))
def test_header_editors_on_the_standard_library_messages(tool, stdlib_messages, tmp_path):
    if not stdlib_messages:
        pytest.skip("the Python standard library's email test messages (test/test_email/data"
                    ", Debian package libpython3.X-testsuite) are not on this machine")
    for path in stdlib_messages:
        ran = confined("filter", tool, EDITORS[tool], path.read_bytes(), tmp_path)
        assert ran.status == 0, (path, ran.stderr)
        assert f"X-Filtered: {tool}".encode() in ran.stdout, path


@pytest.mark.parametrize("tool", sorted(EDITORS))
def test_header_editor_running_a_program_is_stopped(tool, corpus: Corpus, tmp_path):
    """`-s PROGRAM` runs a program per message: the fork is a violation."""
    argv = [EDITORS[tool][0], "-s", "/bin/cat"]
    stopped(confined("filter", tool, argv, corpus.plain, tmp_path), ("clone", "fork", "vfork"))


# --- ripmime -i - -d DIR -------------------------------------------------------------------

def test_ripmime_unpacks_the_parts_exactly_into_the_scratch_directory(corpus: Corpus,
                                                                      tmp_path):
    parts = scratch(tmp_path / "parts")
    ran = confined("run", "ripmime", ["/usr/bin/ripmime", "-i", "-", "-d", str(parts)],
                   corpus.multipart, tmp_path, "--set", f"filesystem.writable={parts}")
    assert ran.status == 0 and ran.report["outcome"] == "ok", ran.stderr
    assert ran.report["uid"] == OWNER_UID
    assert (parts / corpus.attachment_name).read_bytes() == corpus.attachment
    assert (parts / "notes.txt").read_bytes() == corpus.notes
    assert {p.stat().st_uid for p in parts.iterdir()} == {OWNER_UID}


def test_ripmime_into_another_directory_is_refused(corpus: Corpus, tmp_path):
    parts, elsewhere = scratch(tmp_path / "parts"), scratch(tmp_path / "elsewhere")
    ran = confined("run", "ripmime", ["/usr/bin/ripmime", "-i", "-", "-d", str(elsewhere)],
                   corpus.multipart, tmp_path, "--set", f"filesystem.writable={parts}")
    refused(ran, b"Read-only file system")
    assert list(elsewhere.iterdir()) == [] and list(parts.iterdir()) == []


@pytest.mark.parametrize("agent, syscall", [
    ('echo planted > "$1/../planted"', None),  # beside the scratch directory: read-only
    ('exec ln -s /etc/passwd "$1/passwd"', ("symlink", "symlinkat")),
])
def test_ripmime_profile_stops_writing_outside_and_links(agent, syscall, tmp_path):
    parts = scratch(tmp_path / "parts")
    ran = confined("run", "ripmime", ["/bin/sh", "-c", agent, "sh", str(parts)], b"",
                   tmp_path, "--set", f"filesystem.writable={parts}")
    if syscall:
        stopped(ran, syscall)
    else:
        refused(ran, b"Read-only file system")
    assert not (tmp_path / "planted").exists() and list(parts.iterdir()) == []


# --- altermime -----------------------------------------------------------------------------

DISCLAIMER = "This message passed through a confined disclaimer filter."


@pytest.fixture
def disclaimer(tmp_path) -> Path:
    path = shown(tmp_path / "altermime") / "disclaimer.txt"
    path.write_text(DISCLAIMER + "\n")
    path.chmod(0o644)
    return path


def test_altermime_adds_its_disclaimer(corpus: Corpus, disclaimer: Path, tmp_path):
    argv = ["/usr/bin/altermime", "--input=-", f"--disclaimer={disclaimer}"]
    options = ("--set", f"filesystem.readable={disclaimer}")
    plain = confined("filter", "altermime", argv, corpus.plain, tmp_path, *options)
    assert plain.status == 0 and plain.report["outcome"] == "ok", plain.stderr
    assert plain.stdout.rstrip().endswith(DISCLAIMER.encode())
    assert plain.stdout.startswith(corpus.plain.rstrip(b"\n"))

    mixed = confined("filter", "altermime", argv, corpus.multipart, tmp_path, *options)
    assert mixed.status == 0, mixed.stderr
    parts = list(parse(mixed.stdout).walk())
    text = next(p for p in parts if p.get_content_type() == "text/plain")
    attachment = next(p for p in parts if p.get_filename() == corpus.attachment_name)
    assert DISCLAIMER in text.get_content()
    assert attachment.get_content() == corpus.attachment


def test_altermime_without_its_disclaimer_crashes_and_the_message_is_kept(corpus: Corpus,
                                                                          tmp_path):
    ran = confined("filter", "altermime", ["/usr/bin/altermime", "--input=-",
                                           "--disclaimer=/nonexistent/disclaimer.txt"],
                   corpus.plain, tmp_path)
    assert ran.status == EX_TEMPFAIL and ran.report["outcome"] in ("signal", "agent-failed")
    assert ran.stdout == b""


def test_altermime_in_place_on_a_private_copy(corpus: Corpus, disclaimer: Path, tmp_path):
    """The in-place form the profile's comment describes: a copy in the private /tmp, edited
    (FILE.tmp, renamed over FILE), printed; forks and a /tmp granted for this form only."""
    script = 'cat > /tmp/message && altermime --input=/tmp/message "$1" && cat /tmp/message'
    ran = confined("filter", "altermime",
                   ["/bin/sh", "-c", script, "sh", f"--disclaimer={disclaimer}"],
                   corpus.plain, tmp_path, "--set", f"filesystem.readable={disclaimer}",
                   "--set", "filesystem.tmp_bytes=64M", "--set", "limits.file_bytes=64M",
                   "--set", "limits.processes=8", "--set", "seccomp.deny=[]")
    assert ran.status == 0, ran.stderr
    assert ran.stdout.rstrip().endswith(DISCLAIMER.encode())


def test_altermime_editing_a_file_in_place_is_refused(corpus: Corpus, disclaimer: Path,
                                                       tmp_path):
    """Asked to edit a file it can see (the disclaimer itself), altermime cannot write the
    FILE.tmp it renames over it: the file is unchanged.  altermime says so on stdout and
    exits 0 (its own bug), which is why the profile is for --input=- under `filter`."""
    ran = confined("run", "altermime", ["/usr/bin/altermime", f"--input={disclaimer}",
                                        f"--disclaimer={disclaimer}"], b"", tmp_path,
                   "--set", f"filesystem.readable={disclaimer.parent}")
    assert b".tmp, Read-only file system" in ran.stdout, ran.stdout
    assert disclaimer.read_text() == DISCLAIMER + "\n"
    assert [p.name for p in disclaimer.parent.iterdir()] == ["disclaimer.txt"]


# --- mdeliver ------------------------------------------------------------------------------

def test_mdeliver_delivers_into_the_maildir(corpus: Corpus, tmp_path):
    maildir = scratch(tmp_path / "Maildir", "tmp", "new", "cur")
    ran = confined("run", "mdeliver", ["/usr/bin/mdeliver", str(maildir)], corpus.multipart,
                   tmp_path, "--set", f"filesystem.writable={maildir}")
    assert ran.status == 0 and ran.report["outcome"] == "ok", ran.stderr
    [delivered] = (maildir / "new").iterdir()
    assert delivered.read_bytes() == corpus.multipart
    assert delivered.stat().st_uid == OWNER_UID and ran.report["uid"] == OWNER_UID
    assert list((maildir / "tmp").iterdir()) == [] and list((maildir / "cur").iterdir()) == []


def test_mdeliver_into_another_maildir_is_refused(corpus: Corpus, tmp_path):
    maildir = scratch(tmp_path / "Maildir", "tmp", "new", "cur")
    other = scratch(tmp_path / "Other", "tmp", "new", "cur")
    ran = confined("run", "mdeliver", ["/usr/bin/mdeliver", str(other)], corpus.plain,
                   tmp_path, "--set", f"filesystem.writable={maildir}")
    refused(ran, b"No such file or directory")
    assert not any(other.rglob("*.*")) and not any(maildir.rglob("*.*"))


@pytest.mark.parametrize("agent, syscall", [
    ('echo planted > "$1/../planted"', None),
    ('exec ln "$1/new/mail" "$1/new/hardlink"', ("link", "linkat")),
])
def test_mdeliver_profile_stops_writing_outside_and_links(agent, syscall, tmp_path):
    maildir = scratch(tmp_path / "Maildir", "tmp", "new", "cur")
    (maildir / "new" / "mail").write_bytes(b"Subject: x\n\nx\n")
    ran = confined("run", "mdeliver", ["/bin/sh", "-c", agent, "sh", str(maildir)], b"",
                   tmp_path,
                   "--set", f"filesystem.writable={maildir}")
    if syscall:
        stopped(ran, syscall)
    else:
        refused(ran, b"Read-only file system")
    assert not (tmp_path / "planted").exists()
    assert [p.name for p in (maildir / "new").iterdir()] == ["mail"]


# --- dkimverify ----------------------------------------------------------------------------

def tampered(signed: bytes) -> bytes:
    head, body = signed.split(b"\n\n", 1)
    return head + b"\n\n" + body.replace(b"Hello Bob", b"Hello Eve")


@pytest.mark.parametrize("caller, failed", [("qmail", 1), ("sysexits", EX_TEMPFAIL)])
def test_dkim_signature_verifies_and_a_tampered_copy_fails(caller, failed, dkim_material: Dkim,
                                                           tmp_path):
    """dkimverify-keyfile.py (python3-dkim's check, the key from a read-only file): 0 for the
    message as signed; for a changed body 1 to a qmail caller, 75 to a sysexits one."""
    argv = [DKIMVERIFY_KEYFILE, str(dkim_material.keyfile)]
    options = ("--exit-codes", caller, "--set", f"filesystem.readable={dkim_material.keyfile}")
    good = confined("run", "dkimverify", argv, dkim_material.signed, tmp_path, *options)
    assert (good.status, good.stdout) == (0, b"signature ok\n"), good.stderr
    bad = confined("run", "dkimverify", argv, tampered(dkim_material.signed), tmp_path,
                   *options)
    assert bad.status == failed and bad.report["outcome"] == "agent-failed", bad.report
    assert bad.stdout.startswith(b"signature verification failed: body hash mismatch")


def test_debian_dkimverify_runs_but_has_no_dns_for_the_key(dkim_material: Dkim, tmp_path):
    """/usr/bin/dkimverify itself under the profile: no resolver configuration is shown, so
    the key lookup gives up without a socket, and the verdict is "failed" (1), not a kill."""
    ran = confined("run", "dkimverify", ["/usr/bin/dkimverify"], dkim_material.signed,
                   tmp_path, "--exit-codes", "qmail")
    assert (ran.status, ran.stdout) == (1, b"signature verification failed\n"), ran.stderr
    assert ran.report["outcome"] == "agent-failed" and ran.report["denied_syscall"] is None


def test_dkimverify_profile_stops_a_socket(tmp_path):
    agent = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
    ran = confined("run", "dkimverify", ["/usr/bin/python3", "-I", "-c", agent], b"", tmp_path,
                   "--exit-codes", "qmail")
    stopped(ran, "socket", QMAIL_SOFT)


def test_debian_dkimverify_shown_a_resolver_is_stopped(dkim_material: Dkim, tmp_path):
    if not os.path.exists("/etc/resolv.conf"):
        pytest.skip("this machine has no /etc/resolv.conf to show dkimverify")
    ran = confined("run", "dkimverify", ["/usr/bin/dkimverify"], dkim_material.signed,
                   tmp_path, "--exit-codes", "qmail", "--set",
                   "filesystem.etc=ld.so.cache,resolv.conf")
    stopped(ran, "socket", QMAIL_SOFT)


# --- clamscan ------------------------------------------------------------------------------

def test_clamscan_finds_the_test_signatures(corpus: Corpus, clamav_db: Path, tmp_path):
    argv = [*CLAMSCAN, "-d", str(clamav_db), "-"]
    options = ("--exit-codes", "qmail", "--set", f"filesystem.readable={clamav_db}")
    attachment = confined("run", "clamscan", argv, corpus.multipart, tmp_path, *options)
    assert attachment.status == 1 and attachment.report["outcome"] == "agent-failed"
    assert attachment.stdout == b"stdin: Compartment.Test.Attachment.UNOFFICIAL FOUND\n"
    marker = confined("run", "clamscan", argv, corpus.plain, tmp_path, *options)
    assert (marker.status, marker.stdout) == (1, b"stdin: Compartment.Test.Marker.UNOFFICIAL"
                                                 b" FOUND\n"), marker.stderr
    clean = confined("run", "clamscan", argv, corpus.alternative, tmp_path, *options)
    assert (clean.status, clean.stdout) == (0, b"stdin: OK\n"), clean.stderr
    assert clean.report["outcome"] == "ok"


def test_clamscan_statuses_for_a_sysexits_caller(corpus: Corpus, clamav_db: Path, tmp_path):
    """Found (1) and error (2) are both 75 to Postfix or Exim: kept, never bounced, never
    passed as clean."""
    argv = [*CLAMSCAN, "-d", str(clamav_db), "-"]
    options = ("--set", f"filesystem.readable={clamav_db}")
    found = confined("run", "clamscan", argv, corpus.multipart, tmp_path, *options)
    assert found.status == EX_TEMPFAIL and b"FOUND" in found.stdout
    no_database = confined("run", "clamscan", [*CLAMSCAN, "-d", "/nonexistent", "-"],
                           corpus.plain, tmp_path, *options)
    assert no_database.status == EX_TEMPFAIL and no_database.report["agent_status"] == 2


@pytest.mark.parametrize("agent, syscall", [
    ('echo "$1:0:*:00" > "$2/planted.ndb"', None),  # a signature of its own: read-only
    # (HOME set, or Python's start would look the user up through nscd, an AF_UNIX socket)
    ("exec env HOME=/ python3 -I -c 'import socket; socket.socket(socket.AF_INET)'", "socket"),
])
def test_clamscan_profile_stops_database_writes_and_network(agent, syscall, clamav_db: Path,
                                                            tmp_path):
    ran = confined("run", "clamscan", ["/bin/sh", "-c", agent, "sh", "Planted", str(clamav_db)],
                   b"", tmp_path, "--set", f"filesystem.readable={clamav_db}")
    if syscall:
        stopped(ran, syscall)
    else:
        refused(ran, b"Read-only file system")
    assert not (clamav_db / "planted.ndb").exists()

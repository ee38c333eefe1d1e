"""`compartment learn` on each shipped profile's real tool, and `compartment audit` on the result.

For every tool of tests/filters: learn from a general base (`filter`, or `deliver` for the
tools that write into a directory) on a generated sample, again with the proposal as the base
while the proposal says it could not see enough (a directory the root hid, a sample that did
not end ok), exactly as the notes tell an administrator to.  Then the tool runs under the
learned policy, through the command line, on a fresh message and must give its right answer;
and audit must score the learned policy no looser than the shipped profile — except where the
learned one keeps files the tool opens but runs without (named per tool below, and checked to
be the whole difference).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Corpus, Dkim
from test_real_filters import (
    CLAMSCAN,
    DKIMVERIFY_KEYFILE,
    EDITORS,
    SPAMASSASSIN,
    confined,
    parse,
    scratch,
    shown,
    tampered,
)

from compartment import Policy
from compartment.audit import audit

pytestmark = pytest.mark.usefixtures("filter_packages")

ROUNDS = 3  # learn, then at most twice more with the proposal as the base
AGAIN = ("was hidden from the program", "not every sample ended ok")
DISCLAIMER = "A disclaimer added by a learned policy."
# The convention the tool speaks is not learned (the base's is sysexits): given on the command.
QMAIL_SPEAKER = ["--exit-codes", "qmail", "--agent-exit-codes", "qmail"]


@dataclass
class Tool:
    """One tool: how to learn it and how to check it under the learned policy."""

    profile: str
    base: str
    argv: list[str]
    command: str = "filter"  # how the profile runs it: compartment filter or run
    sets: list[str] = field(default_factory=list)  # per-run --set, while learning and after
    options: list[str] = field(default_factory=list)  # more options of the checking run


def learned_policy(tool: Tool, sample: bytes, tmp_path: Path) -> tuple[Path, str]:
    """Learn, round after round while the notes ask for it; the last proposal and its text."""
    sample_path = tmp_path / "sample.eml"
    sample_path.write_bytes(sample)
    base, text = tool.base, ""
    for round_number in range(1, ROUNDS + 1):
        output = tmp_path / f"learned-{tool.profile}-{round_number}.toml"
        sets = [f"--set={item}" for item in tool.sets]
        done = subprocess.run([sys.executable, "-m", "compartment", "learn", "-p", base, *sets,
                               "--sample", str(sample_path), "--output", str(output), "--",
                               *tool.argv], capture_output=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr.decode()
        text = output.read_text()
        base = str(output)
        if not any(again in " ".join(text.split()) for again in AGAIN):
            break
    return Path(base), text


def check_fresh_run(tool: Tool, policy: Path, fresh: bytes, tmp_path: Path,
                    *extra: str) -> object:
    sets = [item for value in tool.sets for item in ("--set", value)]
    return confined(tool.command, str(policy), tool.argv, fresh, tmp_path, *sets,
                    *tool.options, *extra)


def assert_no_looser(tool: Tool, learned: Path, *explained: tuple[str, str]) -> None:
    """audit(learned) <= audit(shipped), or each line that is looser is one of `explained`:
    (area, text of its setting)."""
    mine, theirs = (audit(Policy.load(str(learned), tool.sets)),
                    audit(Policy.load(tool.profile, tool.sets)))
    if mine.exposure <= theirs.exposure:
        return
    looser = [a for a, b in zip(mine.lines, theirs.lines, strict=True)
              if a.weight * a.exposure > b.weight * b.exposure]
    unexplained = [line for line in looser if not any(
        line.area == area and text in line.setting for area, text in explained)]
    assert looser and not unexplained, (mine.table(), theirs.table())


def test_learned_formail_and_reformail(corpus: Corpus, tmp_path):
    for name, argv in EDITORS.items():
        tool = Tool(name, "filter", argv)
        policy, text = learned_policy(tool, corpus.plain, tmp_path)
        assert "deny = [" in text and '"fork",  # added: no sample started a process' in text
        ran = check_fresh_run(tool, policy, corpus.multipart, tmp_path)
        assert ran.status == 0 and ran.report["outcome"] == "ok", ran.stderr
        assert parse(ran.stdout)["X-Filtered"] == name
        assert_no_looser(tool, policy)


def test_learned_spamassassin(corpus: Corpus, tmp_path):
    tool = Tool("spamassassin", "filter", SPAMASSASSIN)
    policy, text = learned_policy(tool, corpus.plain, tmp_path)
    assert '"spamassassin",  # kept' in text or '"spamassassin"' in text
    ran = check_fresh_run(tool, policy, corpus.spam, tmp_path)
    assert ran.status == 0 and ran.report["outcome"] == "ok", ran.stderr
    assert parse(ran.stdout)["X-Spam-Flag"] == "YES"
    # spamassassin opens /etc/passwd (its user's name), /dev/urandom and Perl's libnet.cfg, and
    # runs without them: the shipped profile hides them, learn keeps what the tool opened.
    assert_no_looser(tool, policy, ("etc", "passwd"), ("devices", "urandom"))


def test_learned_ripmime(corpus: Corpus, tmp_path):
    parts = scratch(tmp_path / "parts")
    tool = Tool("ripmime", "deliver", ["/usr/bin/ripmime", "-i", "-", "-d", str(parts)],
                "run", [f"filesystem.writable={parts}"])
    policy, _ = learned_policy(tool, corpus.multipart, tmp_path)
    for part in parts.iterdir():
        part.unlink()
    ran = check_fresh_run(tool, policy, corpus.multipart, tmp_path)
    assert ran.status == 0 and ran.report["outcome"] == "ok", ran.stderr
    assert (parts / corpus.attachment_name).read_bytes() == corpus.attachment
    # A part may be nearly the whole message: learn keeps the base's bound on files (deliver:
    # 512M), where the shipped profile chose 64M.
    assert_no_looser(tool, policy, ("limits", "file_bytes 512M"))


def test_learned_mdeliver(corpus: Corpus, tmp_path):
    maildir = scratch(tmp_path / "Maildir", "tmp", "new", "cur")
    tool = Tool("mdeliver", "deliver", ["/usr/bin/mdeliver", str(maildir)], "run",
                [f"filesystem.writable={maildir}"])
    policy, _ = learned_policy(tool, corpus.plain, tmp_path)
    before = set((maildir / "new").iterdir())
    ran = check_fresh_run(tool, policy, corpus.multipart, tmp_path)
    assert ran.status == 0 and ran.report["outcome"] == "ok", ran.stderr
    [delivered] = set((maildir / "new").iterdir()) - before
    assert delivered.read_bytes() == corpus.multipart
    assert_no_looser(tool, policy)


def test_learned_altermime(corpus: Corpus, tmp_path):
    disclaimer = shown(tmp_path / "altermime") / "disclaimer.txt"
    disclaimer.write_text(DISCLAIMER + "\n")
    disclaimer.chmod(0o644)
    tool = Tool("altermime", "filter", ["/usr/bin/altermime", "--input=-",
                                        f"--disclaimer={disclaimer}"],
                sets=[f"filesystem.readable={disclaimer}"])
    policy, _ = learned_policy(tool, corpus.plain, tmp_path)
    ran = check_fresh_run(tool, policy, corpus.alternative, tmp_path)
    assert ran.status == 0 and ran.report["outcome"] == "ok", ran.stderr
    assert DISCLAIMER.encode() in ran.stdout
    assert_no_looser(tool, policy)


def test_learned_dkimverify(dkim_material: Dkim, tmp_path):
    keyfile = str(dkim_material.keyfile)
    tool = Tool("dkimverify", "filter", [DKIMVERIFY_KEYFILE, keyfile], "run",
                [f"filesystem.readable={keyfile}"], QMAIL_SPEAKER)
    policy, _ = learned_policy(tool, dkim_material.signed, tmp_path)
    bad = check_fresh_run(tool, policy, tampered(dkim_material.signed), tmp_path)
    assert (bad.status, bad.report["outcome"]) == (1, "agent-failed"), bad.stderr
    assert bad.stdout.startswith(b"signature verification failed: body hash mismatch")
    good = check_fresh_run(tool, policy, dkim_material.signed, tmp_path)
    assert (good.status, good.stdout) == (0, b"signature ok\n"), good.stderr
    assert_no_looser(tool, policy)


def test_learned_clamscan(corpus: Corpus, clamav_db: Path, tmp_path):
    tool = Tool("clamscan", "filter", [*CLAMSCAN, "-d", str(clamav_db), "-"], "run",
                [f"filesystem.readable={clamav_db}"], QMAIL_SPEAKER)
    policy, _ = learned_policy(tool, corpus.alternative, tmp_path)
    found = check_fresh_run(tool, policy, corpus.multipart, tmp_path)
    assert found.status == 1, found.stderr
    assert found.stdout == b"stdin: Compartment.Test.Attachment.UNOFFICIAL FOUND\n"
    assert_no_looser(tool, policy)

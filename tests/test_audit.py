"""`compartment audit`: a pure function over a Policy, its table, its score and its command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from compartment import Policy
from compartment.audit import audit

CLI = [sys.executable, "-m", "compartment", "audit"]
TOOLS = ["formail", "reformail", "altermime", "dkimverify", "clamscan", "spamassassin",
         "ripmime", "mdeliver"]
# The profiles that write take their directory per run (their identity is its owner).
PER_RUN = {"ripmime": ["filesystem.writable=/var/spool/unpack/1"],
           "mdeliver": ["filesystem.writable=/home/alice/Maildir"]}


def exposure(name: str, overrides: list[str] | tuple[str, ...] = ()) -> float:
    return audit(Policy.load(name, list(overrides))).exposure


def test_scores_order_strict_each_tool_profile_filter_and_a_writable_home():
    strict, filter_ = exposure("strict"), exposure("filter")
    for tool in TOOLS:
        assert strict < exposure(tool, PER_RUN.get(tool, ())) < filter_, tool
    home = exposure("filter", ["filesystem.writable=/home/alice"])
    mailbox = exposure("filter", ["filesystem.writable=/home/alice/Maildir"])
    assert filter_ < mailbox < home


def test_the_network_cannot_be_opened_so_its_line_reads_zero_everywhere():
    for name in ["strict", "filter", *TOOLS]:
        [line] = [line for line in audit(Policy.load(name, PER_RUN.get(name, ()))).lines
                  if line.area == "network"]
        assert line.exposure == 0 and line.weight > 0 and "no policy can open it" in line.reason


@pytest.mark.parametrize("override", [
    "filesystem.proc=true", "filesystem.readable=/home/alice", "filesystem.devices=null,full",
    "filesystem.etc=ld.so.cache,passwd", "filesystem.tmp_bytes=64M",
    "network.unix_sockets=true", "identity.uid=1234", "descriptors.pass=[5]",
    "limits.memory_bytes=8G", "limits.cpu_seconds=600", "seccomp.deny=[]",
    "filesystem.writable=/srv/mail/box",
])
def test_each_thing_a_policy_allows_raises_the_score(override):
    base = ["identity.gid=1234"] if override.startswith("identity.uid") else []
    assert exposure("formail", base + [override]) > exposure("formail"), override


def test_processes_count_only_where_fork_is_allowed():
    forks = ["seccomp.deny=[]"]
    assert exposure("formail", [*forks, "limits.processes=16"]) > exposure("formail", forks)
    assert exposure("formail", ["limits.processes=16"]) == exposure("formail")


def test_an_allow_list_scores_under_a_deny_list():
    assert exposure("formail", ["seccomp.default=kill", "seccomp.deny=[]",
                                "seccomp.allow=openat"]) < exposure("formail")


def test_every_line_has_an_area_a_setting_a_weight_and_a_reason():
    result = audit(Policy.load("filter"))
    for line in result.lines:
        assert line.area and line.setting and line.reason and 0 <= line.exposure <= 1
        assert line.weight > 0 or line.area == "environment"
    assert 0 <= result.exposure <= 10 and result.score == round(result.exposure, 1)


def test_audit_reads_nothing_but_the_policy():
    """Paths that exist nowhere: audit looks at the policy, not at the machine."""
    policy = Policy.load("filter", ["filesystem.readable=/nonexistent/a",
                                    "filesystem.writable=/nonexistent/home"])
    assert audit(policy).exposure > exposure("filter")


def test_table_json_and_max_exposure():
    table = subprocess.run([*CLI, "-p", "formail"], capture_output=True, text=True, check=False)
    assert table.returncode == 0 and table.stdout.startswith("AREA ")
    assert "exposure 0.4 of 10 (tight) for policy formail" in table.stdout.splitlines()[-1]
    as_json = subprocess.run([*CLI, "-p", "filter", "--json"], capture_output=True, text=True,
                             check=False)
    record = json.loads(as_json.stdout)
    assert record["exposure"] == audit(Policy.load("filter")).score and record["lines"]
    assert {"area", "setting", "weight", "exposure", "reason"} == set(record["lines"][0])
    above = subprocess.run([*CLI, "-p", "filter", "--max-exposure", "1"], capture_output=True,
                           text=True, check=False)
    assert above.returncode == 1 and "is above 1" in above.stderr
    within = subprocess.run([*CLI, "-p", "strict", "--max-exposure", "1"],
                            capture_output=True, text=True, check=False)
    assert within.returncode == 0


@pytest.mark.parametrize("argv, status, message", [
    (["-p", "nonesuch"], 78, "no policy named"),
    (["-p", "mdeliver"], 78, "needs a filesystem.writable directory"),
    (["--max-exposure", "lots"], 64, "invalid float value"),
    (["--bogus"], 64, "unrecognized arguments"),
])
def test_audit_command_errors(argv, status, message):
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True, check=False)
    assert done.returncode == status and message in done.stderr, done.stderr

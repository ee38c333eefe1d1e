"""`compartment learn` on a hostile agent: every way out it tries is recorded, and none of them
leads outside.

Learning lets through what the base policy refuses but a policy could allow, and refuses the
built-in baseline with EPERM instead of killing the agent: so one run of agents/sweep.c meets
every wall in turn (mount, namespaces, the keyring, ptrace, bpf, an AF_INET socket, a set-id
file, the host's files and processes...).  The test looks outside with the hostile suite's own
evidence checks (hostile_evidence.py: listeners, canaries, planted secrets, survivors), and in
the proposal for the record of each try.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_evidence import CANARY_UID, Outside, remove_tree, survivors
from hostile_run import HOSTILE_POOL, MESSAGE

# What the proposal must name, from the listener's record of the baseline (refused with EPERM).
BASELINE_TRIES = ("mount", "unshare", "add_key", "ptrace", "bpf", "socket(AF_INET)",
                  "clone(flags", "chmod")


@pytest.fixture
def host_case_dir(hostile_bin: Path) -> Iterator[Path]:
    """A case directory outside /tmp: a compartment's /tmp is its own, so a path under the
    host's /tmp names nothing of the host's in there, and learn reads it so."""
    path = Path(tempfile.mkdtemp(prefix="hostile-learn-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    remove_tree(path)


@pytest.mark.parametrize("base", ["filter", "strict"])
def test_learning_a_hostile_agent_records_every_try_and_lets_none_out(base: str,
                                                                     host_case_dir: Path,
                                                                     hostile_bin: Path):
    case_dir = host_case_dir
    outside = Outside(case_dir, hostile_bin / "canary", CANARY_UID)
    sample, output = case_dir / "message", case_dir / "learned.toml"
    sample.write_bytes(MESSAGE)
    command = [sys.executable, "-m", "compartment", "learn", "-p", base,
               f"--set=identity.uid_pool={HOSTILE_POOL}", "--sample", str(sample),
               "--output", str(output), "--", str(hostile_bin / "sweep"),
               *outside.agent_args(0), "/etc/shadow"]
    try:
        done = subprocess.run(command, capture_output=True, timeout=120, check=False,
                              env=dict(os.environ, HOSTILE_SECRET=outside.env_secret))
        text = output.read_text() if output.exists() else ""
        traces = outside.traces(done.stdout + done.stderr + text.encode())
    finally:
        outside.close()
    canaries = {outside.canary_same.pid, outside.canary_root.pid, os.getpid()}
    left = survivors(str(outside.evidence), canaries)
    assert done.returncode == 0, done.stderr.decode()
    # The sweep exits 0 only when every try was refused (13 when one worked).
    assert b": ok (delivered)" in done.stderr, done.stderr.decode()
    assert traces == [] and left == [], (traces, left)
    flat = " ".join(line.lstrip("# ") for line in text.splitlines())
    [walls] = [note for note in flat.split(" - ") if "no policy allows these" in note]
    for tried in BASELINE_TRIES:
        assert tried in walls.split(" (sample ")[0], (tried, walls)
    evidence = str(outside.evidence)
    # The host's files it looked for: the unreadable one noted, the one it wanted to write noted,
    # neither proposed; the world-readable one proposed read-only, with the call that asked.
    assert f"openat {evidence}/secret-root" in flat and "others may not read it" in flat, text
    assert "openat /etc/shadow" in flat
    assert f"openat {evidence}/escaped-sweep" in flat and "learn never proposes a writable" in flat
    assert f'"{evidence}/world",  # added: openat {evidence}/world' in text or base == "strict"
    assert "writable = [" not in text

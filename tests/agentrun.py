"""Test helpers: run an agent through the API with files for its three descriptors.

A module of its own (not conftest) so that test modules can import it by a unique name."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from compartment import Policy, Result, run

TESTS = Path(__file__).parent
PROBE = (TESTS / "agents" / "probe.py").read_text()
PYTHON = "/usr/bin/python3"


@dataclass
class Ran:
    result: Result
    stdout: bytes
    stderr: bytes

    def json(self) -> dict:
        return json.loads(self.stdout)


def run_agent(argv, policy="filter", message=b"", overrides=(), **kwargs) -> Ran:
    """Run argv under a policy (name or Policy) with `message` on stdin."""
    if not isinstance(policy, Policy):
        policy = Policy.load(policy, overrides)
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        stdin.write(message)
        stdin.seek(0)
        result = run(argv, policy, stdin=stdin, stdout=out, stderr=err, **kwargs)
        out.seek(0)
        err.seek(0)
        return Ran(result, out.read(), err.read())


def probe(*request: str, policy="filter", overrides=(), **kwargs) -> Ran:
    """Run the probe agent (tests/agents/probe.py, passed in argv) inside a compartment."""
    return run_agent([PYTHON, "-I", "-c", PROBE, *request], policy, overrides=overrides,
                     **kwargs)

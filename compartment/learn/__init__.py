"""`compartment learn`: run a program on sample messages and propose the policy it needs.

A policy tool for the administrator, never on a delivery path (the trusted core passes it
through only as an optional hook: compartment.watch's `learner`).  Each sample runs in a
compartment built from the base policy exactly as `compartment run` builds it, with one
difference, made by the listener (compartment.learn.listener): a syscall the base would refuse
is recorded and let through instead of killing the agent, unless no policy could allow it, in
which case it is recorded and refused with EPERM.  The proposal (compartment.learn.proposal)
is the smallest change from the base that allows what the samples needed, with a reason for
each change, and a list of what could not be learned.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from compartment.api import execute
from compartment.exits import Convention, Outcome
from compartment.learn.document import render
from compartment.learn.evidence import gather
from compartment.learn.listener import Learner, Observation
from compartment.learn.proposal import Proposal, propose
from compartment.policy import Policy, PolicyError
from compartment.policy import _read as read_policy  # the file's own text, read as -p reads it
from compartment.report import Result
from compartment.supervisor import ConfigError, describe_root


class LearnError(Exception):
    """Nothing could be learned: the base policy or the program is wrong (a message says how)."""


@dataclass(frozen=True)
class Learned:
    samples: list[Sample]
    proposal: Proposal
    text: str  # the proposed policy, TOML


def learn(argv: Sequence[str], base: str, overrides: Sequence[str], samples: Sequence[str],
          env: Mapping[str, str] | None = None, command: str = "") -> Learned:
    """Run argv on each sample under `base` (with --set `overrides`), and propose a policy."""
    try:
        policy = Policy.load(base, overrides)
        _, _, text = read_policy(base)  # the base as its file has it, without the overrides
    except PolicyError as err:
        raise LearnError(f"policy: {err}") from None
    runs = run_samples(argv, policy, samples, env)
    failed = [run for run in runs if run.result.outcome is Outcome.CONFIG_ERROR]
    if failed:
        raise LearnError(f"sample {failed[0].name}: {failed[0].result.reason}")
    program = runs[0].result.program
    try:
        plan = describe_root(policy, program)
    except ConfigError as err:  # a named path or the program changed since the samples ran
        raise LearnError(str(err)) from None
    proposal = propose(tomllib.loads(text), policy, plan, program, gather(runs))
    names = ", ".join(run.name for run in runs)
    header = [command or shlex.join(["compartment", "learn", "-p", base, "--", *argv]),
              f"Proposed by `compartment learn` from the policy {base} and {len(runs)} "
              f"sample(s): {names}.  Each change is marked \"learned\" with the call and the "
              "sample that showed the need; review them, and the notes at the end, before use."]
    if overrides:
        header.append("Given with --set while learning (per run: give them again): "
                      + " ".join(shlex.quote(item) for item in overrides))
    description = (f"learned for {os.path.basename(program)} from {base} on "
                   f"{len(runs)} sample(s): review before use")
    return Learned(runs, proposal, render(proposal, header, description))


@dataclass(frozen=True)
class Sample:
    """One sample's run: the Result, what the agent said on stderr, what the listener saw."""

    name: str
    size_bytes: int
    result: Result
    diagnostics: bytes
    seen: Observation


def run_samples(argv: Sequence[str], policy: Policy, samples: Sequence[str],
                env: Mapping[str, str] | None = None) -> list[Sample]:
    """Run argv once per sample file ("-": our stdin) under the learning listener.  The
    agent's output is counted and dropped; its stderr is kept (the first 4 KiB) to show."""
    learner = Learner(policy)
    runs = []
    for sample in samples:
        name = "stdin" if sample == "-" else sample
        seen = learner.start(name)
        with _opened(sample) as message, open(os.devnull, "wb") as sink, \
                tempfile.TemporaryFile() as stderr:
            size = os.fstat(message).st_size
            result, diagnostics = execute(argv, policy, (message, sink.fileno(),
                                                         stderr.fileno()),
                                          env, Convention.SYSEXITS, learner=learner)
        runs.append(Sample(name, size, result, diagnostics, seen))
    return runs


@contextlib.contextmanager
def _opened(sample: str) -> Iterator[int]:
    """A sample's descriptor: the file opened read-only, or a copy of our stdin ("-"), so that
    its size is known (a program's output is compared with it)."""
    if sample == "-":
        with tempfile.TemporaryFile() as copy:
            shutil.copyfileobj(sys.stdin.buffer, copy)
            copy.seek(0)
            yield copy.fileno()
        return
    fd = os.open(sample, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)

"""The command lines of the policy tools: `compartment learn` and `compartment audit`.

    compartment learn [-p BASE] [--set KEY=VALUE]... [--sample FILE]... [--output FILE]
                      -- PROGRAM [ARG...]
    compartment audit [-p POLICY] [--set KEY=VALUE]... [--json] [--max-exposure N]

Administrator's tools, never on a delivery path and not part of the trusted core: compartment.cli
hands them their arguments before it builds the delivery parser, so their options cost a
delivery nothing.  Exit statuses (sysexits.h, as `compartment check`): 0 done; 1 (audit
--max-exposure) the exposure is above N; 64 a usage error; 78 the policy cannot be loaded, or
the program cannot start; 70 learn could not write its output; 130 learn was interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compartment.learn import Sample

EX_USAGE, EX_SOFTWARE, EX_CONFIG = 64, 70, 78
EX_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT
ABOVE_MAXIMUM = 1
TOOLS = ("learn", "audit")


class _Usage(Exception):
    pass


class _Answered(Exception):
    """--help was answered: nothing more to do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Usage(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        # argparse exits only after printing the help: that is an answer, not a failure, and
        # a SystemExit would reach the command's catch-all as an internal error
        raise _Answered


def main(argv: Sequence[str]) -> int:
    """argv starts with the tool's name."""
    tool = argv[0]
    try:
        options = _parser(tool).parse_args(argv[1:])
    except _Usage as err:
        print(err, file=sys.stderr)
        return EX_USAGE
    except _Answered:
        return 0
    return _learn(options, argv) if tool == "learn" else _audit(options)


def _parser(tool: str) -> argparse.ArgumentParser:
    if tool == "learn":
        parser = _Parser(prog="compartment learn", description="Run PROGRAM on sample messages "
                         "in a compartment of the base policy, recording what it needs instead "
                         "of stopping it, and propose a policy.")
    else:
        parser = _Parser(prog="compartment audit", description="What a policy allows, each "
                         "line with its weight, and an exposure score from 0 to 10.")
    parser.add_argument("-p", "--policy", default="filter", help="a shipped policy name or a "
                        "TOML file (default: filter)" + (", the base" if tool == "learn" else ""))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one policy key, e.g. filesystem.readable=/etc/keys")
    if tool == "learn":
        parser.add_argument("--sample", action="append", default=[], metavar="FILE",
                            help="a sample message; repeat for several (default: stdin)")
        parser.add_argument("--output", metavar="FILE",
                            help="write the proposed policy to FILE (default: stdout)")
        parser.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARG...]")
    else:
        parser.add_argument("--json", action="store_true", help="one JSON object")
        parser.add_argument("--max-exposure", type=float, metavar="N",
                            help=f"exit {ABOVE_MAXIMUM} when the exposure is above N")
    return parser


def _audit(options: argparse.Namespace) -> int:
    from compartment.audit import audit
    from compartment.policy import Policy, PolicyError

    try:
        result = audit(Policy.load(options.policy, options.set))
    except PolicyError as err:
        print(f"compartment audit: {err}", file=sys.stderr)
        return EX_CONFIG
    sys.stdout.write(json.dumps(result.to_dict()) + "\n" if options.json else result.table())
    if options.max_exposure is not None and result.score > options.max_exposure:
        print(f"compartment audit: exposure {result.score:.1f} is above "
              f"{options.max_exposure:g}", file=sys.stderr)
        return ABOVE_MAXIMUM
    return 0


def _learn(options: argparse.Namespace, argv: Sequence[str]) -> int:
    from compartment.learn import LearnError, learn

    program = options.program[1:] if options.program[:1] == ["--"] else options.program
    if not program:
        print("compartment learn: no PROGRAM given (compartment learn [OPTIONS] -- PROGRAM "
              "[ARG...])", file=sys.stderr)
        return EX_USAGE
    try:
        learned = learn(program, options.policy, options.set, options.sample or ["-"],
                        command=shlex.join(["compartment", *argv]))
    except LearnError as err:
        print(f"compartment learn: {err}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:  # the compartment of the sample in progress is killed by now
        print("compartment learn: interrupted, nothing written", file=sys.stderr)
        return EX_INTERRUPTED
    for sample in learned.samples:
        _tell(sample)
    changes, notes = len(learned.proposal.changes), len(learned.proposal.notes)
    where = options.output or "stdout"
    try:
        _write(options.output, learned.text)
    except OSError as err:
        print(f"compartment learn: cannot write {where}: {err.strerror}", file=sys.stderr)
        return EX_SOFTWARE
    print(f"compartment learn: {changes} changes from {options.policy} and {notes} notes, "
          f"written to {where}", file=sys.stderr)
    return 0


def _tell(sample: Sample) -> None:
    result = sample.result
    print(f"compartment learn: sample {sample.name}: {result.outcome} ({result.reason}) in "
          f"{result.wall_s:.2f} s, {result.cpu_s:.2f} s of CPU, "
          f"{sample.seen.peak_vm_bytes / (1 << 20):.1f} MiB of address space, "
          f"{result.bytes_out} bytes out", file=sys.stderr)
    if result.outcome != "ok":  # what the program said may explain why
        for line in sample.diagnostics.decode(errors="replace").splitlines()[:8]:
            print(f"    | {line}", file=sys.stderr)


def _write(path: str | None, text: str) -> None:
    """To stdout, or to a file whole or not at all (written aside, then renamed)."""
    if path is None:
        sys.stdout.write(text)
        return
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".learned-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError:
        os.unlink(temporary)
        raise

"""The compartment command: a thin layer over the Python API.

    compartment run [-p POLICY] [--exit-codes sysexits|qmail] [--agent-exit-codes sysexits|qmail]
                    [--report PATH] [--set KEY=VALUE]... -- PROGRAM [ARG...]
    compartment check [-p POLICY] [--set KEY=VALUE]...
    compartment policies

`run` is what an MTA executes, so even a usage error must not exit 2 (Postfix would bounce the
message): every failure of the command line itself is a temporary failure in the caller's
convention, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from compartment.exits import Convention, Outcome, runner_status

EX_CONFIG = 78  # `check` is not on a delivery path: sysexits' configuration error


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    # A fixed help width: the default asks the terminal's size, importing shutil (and with it
    # bz2 and lzma) on every delivery.
    parser = functools.partial(_Parser, formatter_class=functools.partial(
        argparse.HelpFormatter, width=100))
    top = parser(prog="compartment", description="Run a mail agent confined by the kernel.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=parser)
    run = commands.add_parser("run", help="run PROGRAM confined, the message on stdin")
    filt = commands.add_parser("filter", help="run PROGRAM confined; its stdout is the new "
                               "message, handed on to a file, sendmail or stdout")
    check = commands.add_parser("check", help="validate a policy and print it resolved")
    commands.add_parser("policies", help="list the shipped policies")
    destination = filt.add_mutually_exclusive_group()
    destination.add_argument("--output", metavar="PATH",
                             help="write the new message to PATH (whole, or not at all)")
    destination.add_argument("--reinject", nargs="+", metavar="ADDRESS",
                             help="SENDER RECIPIENT...: re-inject with sendmail -G -i")
    filt.add_argument("--sendmail", default="/usr/sbin/sendmail", metavar="PATH",
                      help="the sendmail program for --reinject")
    for sub in (run, check, filt):
        sub.add_argument("-p", "--policy", default="filter",
                         help="a shipped policy name or a TOML file (default: filter)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override one policy key, e.g. limits.cpu_seconds=10")
    for sub in (run, filt):
        sub.add_argument("--exit-codes", choices=("sysexits", "qmail"), default="sysexits",
                         help="the exit-status convention of the caller (default: sysexits)")
        sub.add_argument("--agent-exit-codes", choices=("sysexits", "qmail"),
                         help="the convention the agent speaks (default: the policy's)")
        sub.add_argument("--report", metavar="PATH", help="append one JSON line per run to PATH")
        sub.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARG...]")
    return top


def command() -> NoReturn:
    """The installed command: main(), then exit without tearing the interpreter down, which
    costs a few milliseconds per delivery and has nothing left to do: the report is written,
    the agent's output is in the kernel's hands, and the two streams are flushed here."""
    try:
        status = main()
    except SystemExit as err:  # --help
        status = err.code if isinstance(err.code, int) else 0
    except Exception as err:  # noqa: BLE001 - exit 1 would be a bounce; this is ours to retry
        status = _usage_failure(sys.argv[1:], f"compartment: internal error: "
                                f"{type(err).__name__}: {err}")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(args_list)
    except UsageError as err:
        return _usage_failure(args_list, str(err))
    if args.command == "policies":
        return _policies()
    if args.command == "check":
        return _check(args)
    return _run(args)  # run and filter


def _run(args: argparse.Namespace) -> int:
    from compartment.api import Interrupted, failure, finish, run
    from compartment.policy import Policy, PolicyError

    def interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    # The runner never dies by a signal: Exim bounces a pipe command killed by one.  A signal
    # ends the run as a temporary failure, after the compartment is killed and reported.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGALRM):
        signal.signal(signum, interrupted)

    caller = Convention(args.exit_codes)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        return _usage_failure(["--exit-codes", args.exit_codes], f"compartment {args.command}: no "
                              "PROGRAM given (compartment run [OPTIONS] -- PROGRAM [ARG...])")
    try:
        policy = Policy.load(args.policy, args.set)
    except PolicyError as err:
        result = failure(Outcome.CONFIG_ERROR, f"policy: {err}", args.policy, program, caller)
        finish(result, 2, b"", args.report or "", caller)
        return result.exit_status
    if args.command == "filter":
        from compartment.filtering import filter_message

        result = filter_message(program, policy, output=args.output, reinject=args.reinject,
                                sendmail=args.sendmail, exit_codes=caller,
                                agent_exit_codes=args.agent_exit_codes, report=args.report)
    else:
        result = run(program, policy, exit_codes=caller, agent_exit_codes=args.agent_exit_codes,
                     report=args.report)
    return result.exit_status


def _check(args: argparse.Namespace) -> int:
    from compartment.policy import Policy, PolicyError
    from compartment.rootfs import PlanError, plan
    from compartment.syscall_filter import FilterError, compile_filter

    try:
        policy = Policy.load(args.policy, args.set)
        compiled = compile_filter(policy.seccomp, policy.network)
        root = plan(policy.filesystem, program=None)
        enforcement = _enforcement(policy.limits.enforcement)
    except (PolicyError, FilterError, PlanError) as err:
        print(f"compartment check: {err}", file=sys.stderr)
        return EX_CONFIG
    sys.stdout.write(policy.to_toml())
    print(f"\n# limits enforced by {enforcement}")
    print(f"\n# seccomp: {len(compiled.bpf) // 8} BPF instructions")
    print("# the agent's root on this machine (besides the program itself):")
    for entry in root.entries:
        arrow = " -> " if entry.kind == "symlink" else " from "
        source = "" if entry.source == entry.target else arrow + entry.source
        print(f"#   {entry.kind:7} {entry.target}{source}")
    if root.tmp_bytes:
        print(f"#   tmpfs   /tmp ({root.tmp_bytes} bytes)")
    return 0


def _enforcement(enforcement: str) -> str:
    """How a run by this caller would bound memory, processes and CPU; raises PolicyError when
    it could not run at all."""
    from compartment import cgroups
    from compartment.policy import PolicyError
    from compartment.supervisor import ConfigError, uses_cgroup

    try:
        if not uses_cgroup(enforcement, os.geteuid() != 0):
            why = "unprivileged" if enforcement == "auto" else 'limits.enforcement = "rlimits"'
            return (f"rlimits only ({why}): RLIMIT_AS, RLIMIT_CPU per process, RLIMIT_NPROC "
                    "per uid; the kernel's memory is not counted")
        found = cgroups.find()
    except ConfigError as err:
        raise PolicyError(str(err)) from None
    except cgroups.Unavailable as err:
        raise PolicyError(f'limits.enforcement = "{enforcement}": no usable cgroup: '
                          f"{err}") from None
    cpu = {1: "cpuacct", 2: "cpu.stat"}  # what counts CPU time on v1, on v2

    def shown(h: cgroups.Hierarchy) -> str:
        names = sorted(cpu[h.version] if c == cgroups.CPU else c for c in h.serves)
        return (f"cgroup v{h.version}: {', '.join(names)} below {h.base}"
                + (f", the supervisor moving into {h.leaf}" if h.leaf else ""))
    return f"a cgroup per compartment ({'; '.join(shown(h) for h in found)})"


def _policies() -> int:
    from compartment.policy import shipped

    policies = shipped()
    width = max(map(len, policies), default=0)
    for name, description in policies.items():
        print(f"{name:{width}}  {description}")
    return 0


def _usage_failure(args_list: Sequence[str], message: str) -> int:
    qmail = _wants_qmail(args_list)
    print(("" if qmail else "4.3.5 ") + message, file=sys.stderr)
    if args_list[:1] in (["check"], ["policies"]):
        return EX_CONFIG
    return runner_status(Convention.QMAIL if qmail else Convention.SYSEXITS)


def _wants_qmail(args_list: Sequence[str]) -> bool:
    args = list(args_list)
    head = args[: args.index("--")] if "--" in args else args
    pairs = zip(head, head[1:], strict=False)
    return "--exit-codes=qmail" in head or ("--exit-codes", "qmail") in pairs

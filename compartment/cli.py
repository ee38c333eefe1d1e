"""The compartment command: a thin layer over the Python API.

    compartment run [-p POLICY] [--exit-codes sysexits|qmail]
                    [--agent-exit-codes caller|sysexits|qmail]
                    [--report PATH] [--set KEY=VALUE]... -- PROGRAM [ARG...]
    compartment check [-p POLICY] [--set KEY=VALUE]... | compartment check --serve PATH
    compartment policies
    compartment serve [--config PATH] [--socket PATH] [--log syslog|stderr]
    compartment submit [the options of run] [--fd N]... [--socket PATH] -- PROGRAM [ARG...]
    compartment status [--socket PATH]
    compartment pyfilter [RUN OPTIONS] [--output PATH | --reinject ...] [--] MODULE:FUNCTION
    compartment learn | audit ...     (the policy tools: compartment.policy_tools)
    compartment lmtp | milter ...     (the fronts: compartment.front_command)

`run`, `filter` and `pyfilter` are what an MTA executes, so every way out of them is a contract
status: a usage error, a help request, a crash of ours, a stdout that cannot be written,
descriptors 0, 1 or 2 left closed by the caller.  None exits 1 or 2 (Postfix and Exim would
bounce the message); each is a temporary failure in the caller's convention, with one reason
on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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


class Answered(Exception):
    """argparse answered by itself (--help): its exit status; for a delivery command, where a
    help request is not a delivery, None and the help text, told after our reason line."""

    def __init__(self, status: int | None, text: str = "") -> None:
        super().__init__(status)
        self.status, self.text = status, text


class _Parser(argparse.ArgumentParser):
    delivery = False  # run, filter, pyfilter: their help goes to stderr, and is no success

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")

    def print_help(self, file: object = None) -> None:
        if not self.delivery:  # a delivery command's help goes to stderr, with exit()
            super().print_help(file)  # type: ignore[arg-type]

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            say(message)
        if self.delivery:
            raise Answered(None, self.format_help())
        raise Answered(status)


def _parser() -> argparse.ArgumentParser:
    # A fixed help width: the default asks the terminal's size, importing shutil (and with it
    # bz2 and lzma) on every delivery.
    parser = functools.partial(_Parser, formatter_class=functools.partial(
        argparse.HelpFormatter, width=100))
    top = parser(prog="compartment", description="Run a mail agent confined by the kernel.",
                 epilog="Policy tools: compartment learn --help, compartment audit --help.  "
                 "Fronts: compartment lmtp --help, compartment milter --help.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=parser)
    run = commands.add_parser("run", help="run PROGRAM confined, the message on stdin")
    filt = commands.add_parser("filter", help="run PROGRAM confined; its stdout is the new "
                               "message, handed on to a file, sendmail or stdout")
    check = commands.add_parser("check", help="validate a policy and print it resolved")
    commands.add_parser("policies", help="list the shipped policies")
    pyf = commands.add_parser("pyfilter", help="run MODULE:FUNCTION in a prison on the message; "
                              "the bytes it returns are the new message, handed on as filter's")
    for sub in (filt, pyf):
        destination = sub.add_mutually_exclusive_group()
        destination.add_argument("--output", metavar="PATH",
                                 help="write the new message to PATH (whole, or not at all)")
        destination.add_argument("--reinject", nargs="+", metavar="ADDRESS",
                                 help="SENDER RECIPIENT...: re-inject with sendmail -G -i")
        sub.add_argument("--sendmail", default="/usr/sbin/sendmail", metavar="PATH",
                         help="the sendmail program for --reinject")
    for sub, default in ((run, "filter"), (check, "filter"), (filt, "filter"), (pyf, "strict")):
        sub.add_argument("-p", "--policy", default=default,
                         help=f"a shipped policy name or a TOML file (default: {default})")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override one policy key, e.g. limits.cpu_seconds=10")
    serve = commands.add_parser("serve", help="the resident supervisor (as root): run the "
                                "requests of compartment submit")
    serve.add_argument("--config", default="/etc/compartment/serve.toml", metavar="PATH",
                       help="the server configuration (default: /etc/compartment/serve.toml)")
    serve.add_argument("--log", choices=("syslog", "stderr"), default="syslog",
                       help="where the log lines go (default: syslog, mail facility)")
    serve.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="for a client to send its request once connected (default: 10)")
    status = commands.add_parser("status", help="the resident supervisor's live compartments, "
                                 "counts and latency")
    for sub in (serve, status):
        sub.add_argument("--socket", default="/run/compartment/socket", metavar="PATH",
                         help="the daemon's socket (default: /run/compartment/socket)")
    check.add_argument("--serve", metavar="PATH", help="validate a server configuration "
                       "instead, and print it resolved")
    for sub in (run, filt, pyf):
        sub.delivery = True  # type: ignore[attr-defined]
        sub.add_argument("--exit-codes", choices=("sysexits", "qmail"), default="sysexits",
                         help="the exit-status convention of the caller (default: sysexits)")
        sub.add_argument("--report", metavar="PATH", help="append one JSON line per run to PATH")
    for sub in (run, filt):
        sub.add_argument("--agent-exit-codes", choices=("caller", "sysexits", "qmail"),
                         help="the convention the agent speaks (default: the policy's "
                         "exit.agent_codes, by default the caller's)")
        sub.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARG...]")
    pyf.add_argument("program", nargs=argparse.REMAINDER, metavar="MODULE:FUNCTION",
                     help="the function, by its module's import name and its own")
    return top


def command() -> NoReturn:
    """The installed command: main(), then exit without tearing the interpreter down, which
    costs a few milliseconds per delivery and has nothing left to do: the report is written,
    the agent's output is in the kernel's hands, and the two streams are flushed here."""
    args_list = sys.argv[1:]
    status = _failure_status(args_list)  # if even the catch-all below cannot finish
    try:
        status = main(args_list, _occupy_closed())
    except BaseException as err:  # noqa: BLE001 - the outermost layer: KeyboardInterrupt,
        # MemoryError, a stray SystemExit, a bug of ours: exit 1 would be a bounce
        with contextlib.suppress(BaseException):  # telling failed too: the status still tells
            status = _usage_failure(args_list, f"compartment: internal error: "
                                    f"{type(err).__name__}: {err}")
    for stream in (sys.stdout, sys.stderr):  # None when the caller started us without it
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):  # a full disk, a reader gone
                stream.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None, closed: frozenset[int] = frozenset()) -> int:
    """`closed`: which of descriptors 0, 1, 2 the caller left closed (now placeholders)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["submit"]:  # its own parser: the one bin/compartment runs directly
        from compartment.client import command as submit

        sys.argv[1:] = args_list
        submit()
    if args_list[:1] in (["learn"], ["audit"]):  # policy tools, with parsers of their own
        from compartment.policy_tools import main as tool

        return tool(args_list)
    if args_list[:1] in (["lmtp"], ["milter"]):  # the fronts: daemons, with parsers of their own
        from compartment.front_command import main as front

        return front(args_list)
    try:
        args = _parser().parse_args(args_list)
    except UsageError as err:
        return _usage_failure(args_list, str(err))
    except Answered as answer:
        if answer.status is not None:
            return answer.status
        return _usage_failure(args_list, f"compartment {args_list[0]}: help requested; "
                              "nothing was run", then=answer.text)
    if args.command == "policies":
        return _policies()
    if args.command == "check":
        return _check_serve(args.serve) if args.serve else _check(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "status":
        from compartment.client import status

        return status(args.socket)
    return _run(args, stdin_closed=0 in closed)  # run, filter and pyfilter


def _serve(args: argparse.Namespace) -> int:
    from compartment.serveconfig import ConfigError
    from compartment.server import Server
    from compartment.serverlog import Log

    if os.geteuid() != 0:
        say("compartment serve: must be started as root (it runs each delivery under a "
            "uid of its own)\n")
        return EX_CONFIG
    try:
        server = Server(args.config, args.socket, Log(args.log), args.request_timeout)
    except (ConfigError, OSError) as err:
        say(f"compartment serve: {err}\n")
        return EX_CONFIG
    return server.run()


def _check_serve(path: str) -> int:
    from compartment import serveconfig
    from compartment.policy import Policy, PolicyError

    try:
        config = serveconfig.load(path)
        for rule in config.rules:
            for name in rule.policies:
                # As a peer would use it: a policy that runs as the mailbox's owner needs the
                # writable directory a request gives; any will do to check the rest.
                Policy.load(name, ["filesystem.writable=/var/mail"])
    except (serveconfig.ConfigError, PolicyError, OSError) as err:
        say(f"compartment check: {err}\n")
        return EX_CONFIG
    sys.stdout.write(config.describe())
    return 0


def say(text: str) -> None:
    """Every diagnostic of ours: straight to descriptor 2.  sys.stderr is None when the caller
    started us with it closed, and a write that fails (closed, a full disk, a reader gone)
    must not turn into a traceback and exit 1: the exit status still tells."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode(errors="replace"))


def _occupy_closed() -> frozenset[int]:
    """Descriptors 0, 1 and 2 the caller left closed, each now held by /dev/null opened so
    that using it fails (write-only for stdin, read-only for stdout and stderr): the agent's
    writes there fail as they would unconfined, and no descriptor of ours (a pipe, a spool)
    lands on the number and is taken for the caller's."""
    closed = []
    for fd in (0, 1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            closed.append(fd)
    for fd in closed:
        placeholder = os.open("/dev/null", os.O_WRONLY if fd == 0 else os.O_RDONLY)
        if placeholder != fd:
            os.dup2(placeholder, fd, inheritable=False)
            os.close(placeholder)
    return frozenset(closed)


def _run(args: argparse.Namespace, stdin_closed: bool) -> int:
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
    if args.command == "pyfilter" and len(program) != 1:
        return _usage_failure(["--exit-codes", args.exit_codes], "compartment pyfilter: give "
                              "one MODULE:FUNCTION, after the options")
    if not program:
        return _usage_failure(["--exit-codes", args.exit_codes], f"compartment {args.command}: no "
                              "PROGRAM given (compartment run [OPTIONS] -- PROGRAM [ARG...])")
    try:
        policy = Policy.load(args.policy, args.set)
    except PolicyError as err:
        result = failure(Outcome.CONFIG_ERROR, f"policy: {err}", args.policy, program, caller)
        finish(result, 2, b"", args.report or "", caller)
        return result.exit_status
    if stdin_closed:
        result = failure(Outcome.CONFIG_ERROR, "stdin is closed: there is no message",
                         policy.name, program, caller)
        finish(result, 2, b"", args.report or policy.report.path, caller)
        return result.exit_status
    if args.command == "pyfilter":
        from compartment.pyfilter import pyfilter

        result = pyfilter(program[0], policy, output=args.output, reinject=args.reinject,
                          sendmail=args.sendmail, exit_codes=caller, report=args.report)
    elif args.command == "filter":
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
    from compartment.rootfs import PlanError
    from compartment.supervisor import ConfigError, describe_root
    from compartment.syscall_filter import FilterError, compile_filter

    try:
        policy = Policy.load(args.policy, args.set)
        compiled = compile_filter(policy.seccomp, policy.network)
        root = describe_root(policy)
        enforcement = _enforcement(policy.limits.enforcement)
    except (PolicyError, FilterError, PlanError, ConfigError) as err:
        say(f"compartment check: {err}\n")
        return EX_CONFIG
    print(policy.to_toml(), end="")
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
    """How a run by this caller would bound memory, processes and CPU; raises PolicyError or
    ConfigError when it could not run at all."""
    from compartment import cgroups
    from compartment.policy import PolicyError
    from compartment.supervisor import uses_cgroup

    if not uses_cgroup(enforcement, os.geteuid() != 0):
        why = "unprivileged" if enforcement == "auto" else 'limits.enforcement = "rlimits"'
        return (f"rlimits only ({why}): RLIMIT_AS, RLIMIT_CPU per process, RLIMIT_NPROC per "
                "uid; the kernel's memory is not counted")
    try:
        found = cgroups.find()
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


def _usage_failure(args_list: Sequence[str], message: str, then: str = "") -> int:
    """Tell why, in the caller's convention, as the first line (MTAs read it), followed by
    `then`; return the status for it."""
    say(("" if _wants_qmail(args_list) else "4.3.5 ") + message + "\n" + then)
    return _failure_status(args_list)


def _failure_status(args_list: Sequence[str]) -> int:
    if args_list[:1] in (["check"], ["policies"]):
        return EX_CONFIG
    return runner_status(Convention.QMAIL if _wants_qmail(args_list) else Convention.SYSEXITS)


def _wants_qmail(args_list: Sequence[str]) -> bool:
    args = list(args_list)
    head = args[: args.index("--")] if "--" in args else args
    pairs = zip(head, head[1:], strict=False)
    return "--exit-codes=qmail" in head or ("--exit-codes", "qmail") in pairs

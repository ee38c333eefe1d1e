"""The command lines of the fronts: `compartment lmtp` and `compartment milter`.

    compartment lmtp   --listen unix:PATH|HOST:PORT|systemd [-p POLICY] [--set KEY=VALUE]...
                       [--recipients passwd|passwd:TEMPLATE|map:PATH] [OPTIONS] -- PROGRAM [ARG...]
    compartment milter --listen unix:PATH|inet:PORT@HOST|systemd [-p POLICY] [--set ...]...
                       [--rewrite] [OPTIONS] -- FILTER [ARG...]

Daemons, never on a delivery path and not part of the trusted core: compartment.cli hands them
their arguments before it builds the delivery parser.  They refuse to run as root (each has a
system user of its own).  Exit statuses (sysexits.h): 0 stopped by SIGTERM or SIGINT after
draining; 64 a usage error; 77 started as root; 78 a policy, lookup or socket that cannot be
used.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from collections.abc import Sequence

from compartment.fronts import (
    DEFAULT_SUPERVISOR_SOCKET,
    FrontError,
    MailLog,
    Runner,
    Submit,
    check_templates,
    expand,
    listening_socket,
    parse_listen,
    resident_submit,
)

EX_USAGE, EX_NOPERM, EX_CONFIG = 64, 77, 78
FRONTS = ("lmtp", "milter")


class _Usage(Exception):
    pass


class _Exit(Exception):
    """argparse answered by itself (--help): its exit status."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Usage(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            print(message, file=sys.stderr, end="")
        raise _Exit(status)


def parser(front: str) -> argparse.ArgumentParser:
    lmtp = front == "lmtp"
    what = ("An LMTP server delivering each recipient with PROGRAM in a compartment"
            if lmtp else "A milter running FILTER in a compartment at the end of each message")
    # A fixed width, as the delivery parser's: the man pages are generated from this one.
    parser = _Parser(prog=f"compartment {front}", description=what + ", through the resident "
                     "supervisor (compartment serve).  Runs as its own unprivileged user.",
                     formatter_class=functools.partial(argparse.HelpFormatter, width=100))
    listen = "unix:/PATH, HOST:PORT" if lmtp else "unix:/PATH, inet:PORT@HOST"
    parser.add_argument("--listen", required=True, help=f"{listen} or systemd (socket "
                        "activation)")
    parser.add_argument("-p", "--policy", default="deliver" if lmtp else "filter",
                        help=f"the policy each run asks for (default: "
                        f"{'deliver' if lmtp else 'filter'})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one policy key" + (
                            "; {mailbox} is replaced, e.g. filesystem.writable={mailbox}"
                            if lmtp else ""))
    parser.add_argument("--agent-exit-codes", choices=("caller", "sysexits", "qmail"),
                        help="the convention the agent's exit status speaks")
    parser.add_argument("--socket", default=DEFAULT_SUPERVISOR_SOCKET,
                        help=f"the supervisor's socket (default {DEFAULT_SUPERVISOR_SOCKET})")
    parser.add_argument("--socket-mode", default="0660", type=_octal,
                        help="mode of a unix listening socket (default 0660)")
    parser.add_argument("--socket-group", help="group of a unix listening socket (one of "
                        "the front user's groups)")
    # Postfix's lmtp(8) opens up to its destination concurrency (20) and keeps idle ones in its
    # connection cache besides: an idle session costs the front little, a run is what counts.
    parser.add_argument("--max-sessions", type=_positive, default=100,
                        help="connections at once; more are refused (default 100)")
    parser.add_argument("--max-runs", type=_positive, default=8,
                        help="runs asked of the supervisor at once (default 8)")
    parser.add_argument("--max-message-bytes", type=_positive, default=50 << 20,
                        help="largest message (default 52428800)")
    parser.add_argument("--idle-timeout-s", type=_seconds, default=300.0 if lmtp else 1800.0,
                        help="seconds a session may wait for the MTA's next command")
    parser.add_argument("--log", choices=("syslog", "stderr"), default="syslog",
                        help="where the line per message and per recipient goes (default: "
                        "syslog, mail facility)")
    parser.add_argument("--drain-timeout-s", type=_seconds, default=330.0,
                        help="on SIGTERM, seconds to let deliveries in hand finish")
    if lmtp:
        parser.add_argument("--recipients", default="passwd",
                            help="passwd (default: {home}/Maildir of a user with uid >= "
                            "--min-uid), passwd:TEMPLATE, or map:/PATH")
        parser.add_argument("--recipient-delimiter", default="", metavar="CHARACTER",
                            help="as Postfix's recipient_delimiter: alice+ext is alice's, "
                            "with EXTENSION=ext")
        parser.add_argument("--min-uid", type=int, default=1000,
                            help="lowest uid a passwd recipient may have (default 1000)")
        parser.add_argument("--max-recipients", type=_positive, default=100,
                            help="recipients per transaction (default 100)")
        parser.add_argument("--data-timeout-s", type=_seconds, default=600.0,
                            help="seconds from DATA to the final dot (default 600)")
        parser.add_argument("--hostname", help="the name in the greeting and LHLO reply "
                            "(default: this host's name)")
    else:
        parser.add_argument("--rewrite", action="store_true",
                            help="FILTER's stdout is the new message: what changed is applied "
                            "as milter header and body modifications")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARG...]")
    return parser


def main(argv: Sequence[str], submit: Submit | None = None, allow_root: bool = False) -> int:
    """argv starts with the front's name.  `submit` and `allow_root` are for the tests, which
    run the fronts as root with a stand-in for the supervisor's client."""
    front = argv[0]
    try:
        options = parser(front).parse_args(argv[1:])
        program = options.program[1:] if options.program[:1] == ["--"] else options.program
        if not program:
            raise _Usage(f"compartment {front}: no PROGRAM given (-- PROGRAM [ARG...])")
    except _Usage as err:
        print(err, file=sys.stderr)
        return EX_USAGE
    except _Exit as answered:
        return int(str(answered) or 0)
    if os.geteuid() == 0 and not allow_root:
        print(f"compartment {front}: refusing to run as root: run it as its own system user "
              f"(compartment-{front}; User= in its systemd unit)", file=sys.stderr)
        return EX_NOPERM
    try:
        runner = runner_from(options, program, front, submit or resident_submit())
        if front == "lmtp":
            try:
                from compartment.lmtp import prepare
            except ImportError as err:
                raise FrontError(f"the LMTP front needs aiosmtpd ({err}): apt-get install "
                                 "python3-aiosmtpd, or pip install 'compartment[fronts]'") from None
        else:
            from compartment.milter import prepare  # type: ignore[no-redef]
        log = MailLog(f"compartment-{front}", options.log)
        serve = prepare(options, runner, log)
        sock = listening_socket(parse_listen(options.listen, front == "milter"),
                                options.socket_mode, options.socket_group)
    except FrontError as err:
        print(f"compartment {front}: {err}", file=sys.stderr)
        return EX_CONFIG
    asyncio.run(serve(sock, f"listening on {options.listen}, policy {options.policy}, "
                      f"supervisor at {options.socket}"))
    return 0


def runner_from(options: argparse.Namespace, program: list[str], front: str,
                submit: Submit) -> Runner:
    """The run request, its placeholders checked and its policy loaded once (a typo in a
    policy name or key stops the front at start, not every delivery)."""
    from compartment.policy import Policy, PolicyError

    check_templates(program, options.set)
    if front == "milter" and any("{" in item for item in [*program, *options.set]):
        from compartment.fronts import PLACEHOLDERS

        for item in [*program, *options.set]:
            if any(f"{{{name}}}" in item for name in PLACEHOLDERS):
                raise FrontError(f"{item}: the milter has no per-recipient placeholders")
    try:
        Policy.load(options.policy, [expand(s, {"mailbox": "/mailbox"}) for s in options.set])
    except PolicyError as err:
        raise FrontError(f"policy: {err}") from None
    return Runner(tuple(program), options.policy, tuple(options.set),
                  options.agent_exit_codes, options.socket, submit)


def _octal(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400 * 7:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value

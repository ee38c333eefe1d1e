"""Write the man pages from the sources they describe, so that they cannot drift from them.

    python tools/manpages.py DIR      # writes DIR/compartment.1, DIR/compartment-policy.5, ...

- compartment(1): every command and option, read from the command's argparse parser
  (compartment.cli._parser), with their help text, choices and defaults.
- compartment-policy(5): docs/policy.md turned into roff; its field tables are checked against
  the field metadata of compartment/policy.py by tests/test_manpages.py, so both say the same.
- compartment-COMMAND(8): one page per command listed in DAEMON_COMMANDS that the parser has
  (`serve`): its options, and as its description docs/COMMAND.md, or else the README's section
  whose heading names `compartment COMMAND`.

tests/test_manpages.py fails when a shipped page under docs/man differs from what this writes;
`make man` rewrites them.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compartment.cli import _parser  # noqa: E402 - after the path to the tree

DATE = "2026"  # changes only by hand: a date that moved on every build would always differ
VERSION = "compartment 0.1.0"
DAEMON_COMMANDS = ("serve",)
# The fronts (compartment.front_command): daemons with parsers of their own, one page each, the
# README's section on them as the description.
FRONT_COMMANDS = ("lmtp", "milter")
PROGRAM_HELP = ("the program run confined, by path with this argv, never through a shell; a "
                "name without / is looked up on the policy's PATH")

DESCRIPTION = r"""
.B compartment
runs mail delivery agents and mail filters confined by the kernel.
Where a Postfix
.BR pipe (8)
.BR argv= ,
a qmail
.I .qmail
program line or an Exim pipe transport ran a program directly, put
.B "compartment run \-p POLICY \-\-"
in front of it.
.PP
A small trusted supervisor clones the program into new namespaces and confines it in a fixed
order (a new root, a dedicated uid, rlimits, no capabilities, no_new_privs, a seccomp filter,
only descriptors 0, 1 and 2), hands it the message on standard input as the caller's own
descriptor, and returns an exit status the MTA understands.
Every failure that is not the message's fault (a timeout, a resource limit, a sandbox
violation, a bad policy, an internal error) is a temporary failure, so the MTA keeps the
message and retries.
.PP
.B run
never exits 2 on a usage error (Postfix would bounce the message): it exits 75, or 111 with
.BR "\-\-exit\-codes qmail" .
"""

EXIT_STATUS = r"""
.TP
.B 0
The agent delivered (or the filter's result was handed on).
.TP
.B 75 \fR(\fP111\fR with \fP\-\-exit\-codes qmail\fR)
A temporary failure: timeout, CPU, memory, output or file-size limit, seccomp violation, a
signal, a bad policy, a missing program, no user namespaces, an internal error.
The first line on standard error is
.B "4.x.x compartment: REASON"
(or
.B "compartment: REASON"
for qmail): 4.4.7 for a timeout, 4.7.0 for a violation, 4.3.5 for configuration, 4.3.0
otherwise.
.TP
.B 65, 67, 68, 69, 77 \fR(\fP100\fR for qmail)
The agent's own verdict on the message, passed on.
Every other status of the agent becomes 75 (111).
.TP
.B 78
.B check
found the policy invalid.
"""

FILES = r"""
.TP
.I /etc/compartment/policies/
The administrator's policies, used by path
.RB ( "\-p /etc/compartment/policies/NAME.toml" ).
It and every policy in it must be owned by root and writable by no one else.
.TP
.I /var/cache/compartment/seccomp/
Compiled syscall filters (root); unprivileged callers use
.IR ~/.cache/compartment/seccomp/ .
.TP
.I /run/compartment/uids/
Leases of the uid pool.
"""


# Characters the docs use that man's terminal output cannot show, as roff names them.
_SPECIAL = {"…": "...", "—": "\\(em", "–": "\\(en", "×": "\\(mu", "≤": "\\(<=", "≥": "\\(>=",
            "→": "\\(->"}


def roff_text(text: str) -> str:
    """Plain text for roff: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(_SPECIAL.get(char, char) for char in text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest: choice.help or "" for choice in action._choices_actions}
    return {}


def _usage(name: str, sub: argparse.ArgumentParser) -> str:
    """argparse's own usage, wrapped by it at 100 columns."""
    lines = sub.format_usage().removeprefix("usage: ").rstrip().split("\n")
    if lines[-1].strip() == "...":  # argparse's word for the program and its arguments
        lines[-1] = "-- PROGRAM [ARG...]"
    return "\n".join([lines[0], *("    " + line.strip() for line in lines[1:])])


def _option_item(action: argparse.Action) -> Iterator[str]:
    if action.option_strings:
        names = ", ".join(f"\\fB{roff_text(o)}\\fR" for o in action.option_strings)
        if action.nargs == 0:
            head = names
        else:
            metavar = action.metavar or (("{" + ",".join(action.choices) + "}")
                                         if action.choices else action.dest.upper())
            more = " ..." if action.nargs in ("+", "*") else ""
            head = f"{names} \\fI{roff_text(str(metavar))}\\fR{more}"
    else:
        head = "\\fB\\-\\-\\fR \\fIPROGRAM\\fR [\\fIARG\\fR ...]"
    yield ".TP"
    yield head
    help_text = (action.help or "").replace("%(prog)s", "compartment")
    if not action.option_strings:
        help_text = PROGRAM_HELP
    if action.default not in (None, [], False, argparse.SUPPRESS) and \
            "default" not in help_text:
        help_text += f" (default: {action.default})"
    if action.dest != "help" and action.default == [] and action.option_strings:
        help_text += "; may be given more than once"
    yield roff_text(help_text)


def _commands_section(parser: argparse.ArgumentParser, skip: tuple[str, ...]) -> Iterator[str]:
    helps = _command_help(parser)
    for name, sub in _subcommands(parser).items():
        if name in skip:
            continue
        yield f".SS {name}"
        yield ".nf"
        yield roff_text(_usage(name, sub))
        yield ".fi"
        yield ".PP"
        yield roff_text(helps.get(name, "").rstrip(".") + ".")
        for action in sub._actions:
            yield from _option_item(action)


def compartment_1() -> str:
    parser = _parser()
    commands = _subcommands(parser)
    daemons = tuple(name for name in DAEMON_COMMANDS if name in commands)
    lines = [f'.TH COMPARTMENT 1 "{DATE}" "{VERSION}" "User Commands"',
             ".SH NAME", "compartment \\- run mail delivery agents and filters confined by "
             "the kernel", ".SH SYNOPSIS", ".nf"]
    lines += [roff_text(_usage(name, sub)) for name, sub in commands.items()]
    lines += [".fi", ".SH DESCRIPTION", DESCRIPTION.strip(), ".SH COMMANDS"]
    lines += list(_commands_section(parser, daemons))
    for name in daemons:
        lines += [f".SS {name}", f"See \\fBcompartment\\-{name}\\fR(8)."]
    lines += [".SH EXIT STATUS", EXIT_STATUS.strip(), ".SH FILES", FILES.strip(),
              ".SH SEE ALSO", ", ".join([r"\fBcompartment\-policy\fR(5)",
                                         *(rf"\fBcompartment\-{d}\fR(8)" for d in daemons),
                                         r"\fBpipe\fR(8)", r"\fBlocal\fR(8)",
                                         r"\fBseccomp\fR(2)", r"\fBnamespaces\fR(7)"])]
    return "\n".join(lines) + "\n"


def daemon_8(name: str) -> str:
    """compartment-NAME(8) for a daemon command: its options, and docs/NAME.md's text."""
    sub = _subcommands(_parser())[name]
    lines = _page_8(name, _command_help(_parser())[name], sub)
    guide = REPO / "docs" / f"{name}.md"
    text = guide.read_text() if guide.exists() else _readme_section(f"`compartment {name}`")
    if text:
        lines += [".SH DESCRIPTION", *markdown_to_roff(text)]
    lines += [".SH SEE ALSO", r"\fBcompartment\fR(1), \fBcompartment\-policy\fR(5)"]
    return "\n".join(lines) + "\n"


def front_8(name: str) -> str:
    """compartment-NAME(8) for a front: its options, and the README's section on the fronts."""
    from compartment.front_command import parser

    sub = parser(name)
    summary = (sub.description or "").split(",")[0].removeprefix("An ").removeprefix("A ")
    lines = _page_8(name, summary, sub)
    lines += [".SH DESCRIPTION", *markdown_to_roff(_readme_section("LMTP and milter fronts"))]
    lines += [".SH SEE ALSO", r"\fBcompartment\fR(1), \fBcompartment\-serve\fR(8), "
              r"\fBcompartment\-policy\fR(5)"]
    return "\n".join(lines) + "\n"


def _page_8(name: str, summary: str, sub: argparse.ArgumentParser) -> list[str]:
    """A section 8 page's head: title, name, synopsis and options."""
    lines = [f'.TH COMPARTMENT\\-{name.upper()} 8 "{DATE}" "{VERSION}" '
             '"System Administration"', ".SH NAME",
             f"compartment\\-{name} \\- {roff_text(summary)}",
             ".SH SYNOPSIS", ".nf", roff_text(_usage(name, sub)), ".fi", ".SH OPTIONS"]
    for action in sub._actions:
        lines += _option_item(action)
    return lines


def _readme_section(naming: str) -> str:
    """The README's `## ` section whose heading contains `naming`, without its heading."""
    match = re.search(rf"^## [^\n]*{re.escape(naming)}[^\n]*\n(.*?)(?=^## |\Z)",
                      (REPO / "README.md").read_text(), re.M | re.S)
    return match[1] if match else ""


def _inline(text: str) -> str:
    """Markdown spans to roff: `code` and **strong** bold, [text](link) as text."""
    text = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
    parts = re.split(r"(`[^`]+`|\*\*[^*]+\*\*)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"\\fB{roff_text(part[1:-1])}\\fR")
        elif part.startswith("**") and part.endswith("**") and len(part) > 3:
            out.append(f"\\fB{roff_text(part[2:-2].replace('`', ''))}\\fR")
        else:
            out.append(roff_text(part))
    return "".join(out)


def _blocks(markdown: str) -> Iterator[list[str]]:
    """Paragraphs, list items, table rows and headings, each as its lines."""
    block: list[str] = []
    for line in markdown.split("\n"):
        code = line.startswith("    ") and (not block or block[0].startswith("    "))
        starts = line.startswith(("#", "- ", "|")) or not line.strip() or \
            (code and not block)
        ends_code = bool(block) and block[0].startswith("    ") and not code
        if block and (starts or ends_code or block[0].startswith(("#", "|"))):
            yield block
            block = []
        if line.strip():
            block.append(line)
    if block:
        yield block


def markdown_to_roff(markdown: str) -> list[str]:
    """The subset docs/*.md use: headings, paragraphs, "- " lists and key tables."""
    lines: list[str] = []
    for block in _blocks(markdown):
        head = block[0]
        text = " ".join(line.strip() for line in block)
        if head.startswith("    "):
            lines += [".PP", ".nf", *(roff_text(line[4:]) for line in block), ".fi"]
            continue
        if head.startswith("# "):
            continue  # the page's own title
        if head.startswith("## "):
            lines += [".SH " + roff_text(head[3:].upper())]
        elif head.startswith("### "):
            lines += [".SS " + roff_text(head[4:].strip("[]").strip())]
        elif head.startswith("|"):
            cells = [c.strip() for c in head.strip().strip("|").split("|")]
            if set("".join(cells)) <= set("-: ") or cells[0] == "key":
                continue  # the header and its rule
            lines += [".TP", _inline(cells[0]) + " (default " + _inline(cells[1]) + ")",
                      _inline(" | ".join(cells[2:]))]
        elif head.startswith("- "):
            lines += [".IP \\(bu 2", _inline(text[2:])]
        else:
            lines += [".PP", _inline(text)]
    return lines


def compartment_policy_5() -> str:
    markdown = (REPO / "docs" / "policy.md").read_text()
    lines = [f'.TH COMPARTMENT\\-POLICY 5 "{DATE}" "{VERSION}" "File Formats"',
             ".SH NAME", "compartment\\-policy \\- the policy file of compartment(1)",
             ".SH SYNOPSIS", ".nf", "/etc/compartment/policies/\\fINAME\\fR.toml",
             "\\fBcompartment run \\-p\\fR \\fIPOLICY\\fR [\\fB\\-\\-set\\fR "
             "\\fISECTION.KEY=VALUE\\fR]...", ".fi", ".SH DESCRIPTION"]
    body = markdown_to_roff(markdown)
    fields = body.index(".SS filesystem") if ".SS filesystem" in body else len(body)
    lines += body[:fields] + [".SH FIELDS"] + body[fields:]
    lines += [".SH SEE ALSO", r"\fBcompartment\fR(1)"]
    return "\n".join(lines) + "\n"


def markdown_rows() -> dict[str, list[str]]:
    """The table rows docs/policy.md must hold, per section, from the field metadata."""
    import dataclasses

    from compartment.policy import _SECTIONS, _toml

    rows = {}
    for section, cls in _SECTIONS.items():
        rows[section] = [
            f"| `{spec.name.rstrip('_')}` | `{_toml(spec.default, spec.name)}` | "
            f"{spec.metadata['doc']} |" for spec in dataclasses.fields(cls)]
    return rows


def pages() -> dict[str, str]:
    """File name → text of every page this project ships."""
    found = {"compartment.1": compartment_1(), "compartment-policy.5": compartment_policy_5()}
    commands = _subcommands(_parser())
    for name in DAEMON_COMMANDS:
        if name in commands:
            found[f"compartment-{name}.8"] = daemon_8(name)
    for name in FRONT_COMMANDS:
        found[f"compartment-{name}.8"] = front_8(name)
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/manpages.py DIR", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (directory / name).write_text(text)
        print(directory / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

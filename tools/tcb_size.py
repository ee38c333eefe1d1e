"""Count the trusted computing base: lines of code in the modules that run in the supervisor or
in the child before exec, without blank lines, comments and docstrings.

    python tools/tcb_size.py          (make size)
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "compartment"
# The policy loader and the two compilers of its sections (syscall filter, root plan) turn the
# administrator's own configuration into data (frozen dataclasses, a BPF program, a mount plan)
# before anything runs, and the compilers' results are cached; they are counted apart so the
# figure for the code that handles the agent stays visible.
LOADER = {"policy.py", "policy_fields.py", "syscall_filter.py", "rootfs.py"}
# The policy tools (learn, audit) are the administrator's, never on a delivery path: counted
# apart.  The few lines that let `compartment learn` hook the supervisor (watch.py's learner,
# supervise's learner argument) are in the core's figure.
TOOLS = {"audit.py", "policy_tools.py"}
TOOL_DIRS = {"learn"}
# The LMTP and milter fronts: unprivileged daemons, each under its own user, which parse the MTA's
# protocol and hand every run to the resident supervisor through its client: counted apart.
FRONTS = {"fronts.py", "front_command.py", "lmtp.py", "recipients.py", "milter.py",
          "milter_protocol.py", "milter_edits.py"}


def is_tool(path: Path) -> bool:
    if ROOT not in path.parents:
        return False  # bin/compartment
    relative = path.relative_to(ROOT)
    return relative.name in TOOLS or relative.parts[0] in TOOL_DIRS
# The resident supervisor's own modules (compartment serve), privileged: the daemon's loop and
# request handling, the spawner, the wire format's decoder, authorization, its configuration.
DAEMON = {"server.py", "connection.py", "listening.py", "ahead.py", "spawner.py", "protocol.py",
          "authorize.py", "serveconfig.py", "serverlog.py"}
# Unprivileged: the submit client runs as the MTA's user (it shares protocol.py's encoder).
CLIENT = {"client.py"}
DAEMON_ENTRY = ("server.py", "spawner.py")  # and cli.py, whose other commands it does not run


def imported(path: Path) -> set[Path]:
    """The compartment modules a module imports, anywhere in it (top level or in functions)."""
    found = set()
    for node in _walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != "compartment":
                continue
            base = ROOT.joinpath(*parts[1:])
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    found.add(candidate)
    return found


def _walk(node: ast.AST) -> list[ast.AST]:
    """Every node, but those under `if TYPE_CHECKING:` (imports for annotations only)."""
    if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and \
            node.test.id == "TYPE_CHECKING":
        return []
    return [node] + [n for child in ast.iter_child_nodes(node) for n in _walk(child)]


def closure(entries: list[Path]) -> set[Path]:
    seen: set[Path] = set()
    todo = list(entries)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += imported(path) | ({path.parent / "__init__.py"} - {path})
    return seen


def code_lines(path: Path) -> int:
    lines: set[int] = set()
    previous = tokenize.INDENT
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        kind = token.type
        is_docstring = kind == tokenize.STRING and previous in (tokenize.INDENT, tokenize.DEDENT,
                                                                tokenize.NEWLINE)
        if kind not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                        tokenize.DEDENT, tokenize.ENDMARKER) and not is_docstring:
            lines.update(range(token.start[0], token.end[0] + 1))
        if kind not in (tokenize.COMMENT, tokenize.NL):
            previous = kind
    return len(lines)


def shell_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


def main() -> int:
    files = sorted(ROOT.rglob("*.py"))
    counts = {f: code_lines(f) for f in files}
    command = ROOT.parent / "bin" / "compartment"  # the shell in front of the CLI
    counts[command] = shell_lines(command)
    in_daemon = closure([ROOT / name for name in DAEMON_ENTRY]) | {ROOT / "cli.py", command}
    for path, count in counts.items():
        side = "client, unprivileged" if path.name in CLIENT else \
            "daemon" if path in in_daemon else "tool" if is_tool(path) else \
            "front, unprivileged" if path.name in FRONTS else ""
        print(f"{count:6d}  {path.relative_to(ROOT.parent)}" + (f"  ({side})" if side else ""))
    groups = {"trusted core (supervisor, confinement, CLI glue)":
              lambda p: p.name not in LOADER | DAEMON | CLIENT | FRONTS and not is_tool(p),
              "policy loader and its compilers (syscall filter, root plan)":
              lambda p: p.name in LOADER,
              "policy tools (learn, audit): not on the delivery path": is_tool,
              "resident supervisor's own modules (server, connection, listening, ahead, "
              "spawner, protocol, authorization, config, log)": lambda p: p.name in DAEMON,
              "everything privileged in the resident supervisor's processes (all of the "
              "above it imports)": lambda p: p in in_daemon,
              "submit client (unprivileged)": lambda p: p.name in CLIENT,
              "LMTP and milter fronts (unprivileged, each its own user)":
              lambda p: p.name in FRONTS}
    print()
    for title, member in groups.items():
        print(f"{sum(c for p, c in counts.items() if member(p)):6d}  {title}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

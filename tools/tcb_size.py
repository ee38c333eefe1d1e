"""Count the trusted computing base: lines of code in the modules that run in the supervisor or
in the child before exec, without blank lines, comments and docstrings.

    python tools/tcb_size.py          (make size)
"""

from __future__ import annotations

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


def is_tool(path: Path) -> bool:
    relative = path.relative_to(ROOT)
    return relative.name in TOOLS or relative.parts[0] in TOOL_DIRS


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
    core = {f: code_lines(f) for f in files if f.name not in LOADER and not is_tool(f)}
    command = ROOT.parent / "bin" / "compartment"  # the shell in front of the CLI
    core[command] = shell_lines(command)
    loader = {f: code_lines(f) for f in files if f.name in LOADER}
    tools = {f: code_lines(f) for f in files if is_tool(f)}
    for path, count in {**core, **loader, **tools}.items():
        print(f"{count:6d}  {path.relative_to(ROOT.parent)}")
    print(f"{sum(core.values()):6d}  trusted core (supervisor, confinement, CLI glue)")
    print(f"{sum(loader.values()):6d}  policy loader and its compilers (syscall filter, root plan)")
    print(f"{sum(tools.values()):6d}  policy tools (learn, audit): not on the delivery path")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The proposal written out: the base policy's keys as its file has them, each learned change
with its reasons in comments above it, and what could not be learned at the end.

Policy tool (`compartment learn`), pure.  Paths in the comments came from the agent's memory:
every comment is made printable (escapes for control characters), so that no path can end a
comment line and write a key of its own; values are TOML strings, escaped the same way.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from collections.abc import Sequence
from typing import Any

from compartment.learn.proposal import Change, Proposal
from compartment.policy import Policy

WIDTH = 100
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
SECTIONS = tuple(f.name for f in dataclasses.fields(Policy)
                 if f.name not in ("name", "source", "description"))


def render(proposal: Proposal, header: Sequence[str], description: str) -> str:
    lines = [*_comment(header), f"description = {value(description)}"]
    for section in SECTIONS:
        table = proposal.base.get(section, {})
        keys = [*table, *(key for (where, key) in proposal.changes
                          if where == section and key not in table)]
        if not keys:
            continue
        lines += ["", f"[{section}]"]
        for key in keys:
            change = proposal.changes.get((section, key))
            if change is None:
                lines += _wrapped(f"{_key(key)} = ", table[key])
            else:
                lines += _assignment(key, change)
    if proposal.notes:
        lines += ["", *_comment(["Not learned (review these too):"])]
        for note in proposal.notes:
            lines += _comment([f"- {note}"], indent="    ")
    return "\n".join(lines) + "\n"


def _assignment(key: str, change: Change) -> list[str]:
    lines = _comment(change.why)
    if not change.items:
        return [*lines, *_wrapped(f"{_key(key)} = ", change.value)]
    lines.append(f"{_key(key)} = [")
    for item in change.value:
        note = change.items.get(item)
        text = f"    {value(item)},"
        lines.append(f"{text}  # {printable(note)}" if note else text)
    return [*lines, "]"]


def _wrapped(start: str, item: Any) -> list[str]:
    """`key = value`, a long list spread over lines of whole items."""
    line = start + value(item)
    if len(line) <= WIDTH or not isinstance(item, list | tuple):
        return [line]
    body = textwrap.wrap(", ".join(value(v) for v in item) + ",", WIDTH, initial_indent="    ",
                         subsequent_indent="    ", break_long_words=False,
                         break_on_hyphens=False)
    return [start + "[", *body, "]"]


def value(item: Any) -> str:
    """A TOML value for what a policy document holds."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int | float):
        return repr(item)
    if isinstance(item, str):
        return json.dumps(item)  # a TOML basic string: the same escapes
    if isinstance(item, list | tuple):
        return "[" + ", ".join(value(v) for v in item) + "]"
    if isinstance(item, dict):
        return "{ " + ", ".join(f"{_key(k)} = {value(v)}" for k, v in item.items()) + " }"
    raise TypeError(f"no TOML form for {type(item).__name__}")


def printable(text: str) -> str:
    """Text safe inside a comment: every character that is not printable escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape",
                                                      "backslashreplace").decode("ascii")
                   for c in text)


def _comment(texts: Sequence[str], indent: str = "") -> list[str]:
    lines = []
    for text in texts:
        lines += textwrap.wrap(printable(text), WIDTH - 2, initial_indent="# ",
                               subsequent_indent="# " + indent, break_long_words=False,
                               break_on_hyphens=False)
    return lines


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)

"""The value forms a policy field accepts: sizes with units, durations, paths, names, ids.

Each parser takes what TOML (or --set) gave and returns the value the policy holds, or raises
Bad with the form it expected; the loader (compartment.policy) adds the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

Parser = Callable[[Any], Any]

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
_TIME_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*")
NAME_RE = re.compile(r"@?[a-z0-9_-]+")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Bad(ValueError):
    """Raised by a field parser with the expected form; the loader adds source and key."""


def field(parse: Parser, default: Any, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"parse": parse, "doc": doc})


def size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise Bad('a byte count: an integer or a string like "512M" (K, M, G, T: powers of 1024)')
    return int(match[1]) * _SIZE_UNITS[match[2].upper()]


def seconds(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _TIME_RE.fullmatch(value) if isinstance(value, str) else None
    if not match or float(match[1]) <= 0:
        raise Bad('a positive duration: seconds as a number, or a string like "30s", "5m", "1h"')
    return float(match[1]) * _TIME_UNITS[match[2]]


def count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31:
        return value
    raise Bad("a whole number from 0 up")


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Bad("true or false")


def text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise Bad("a string")


def choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        if value in choices:
            return value
        raise Bad("one of " + ", ".join(f'"{c}"' for c in choices))
    return parse


def listing(item: Parser, what: str) -> Parser:
    def parse(value: Any) -> tuple[Any, ...]:
        if isinstance(value, str):  # from --set: "a,b" is a list of two
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise Bad(f"a list of {what}")
        return tuple(item(v) for v in value)
    return parse


def abspath(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise Bad("absolute paths")
    if ".." in value.split("/"):
        raise Bad('absolute paths without ".."')
    return os.path.normpath(value)


def etc_name(value: Any) -> str:
    if not isinstance(value, str) or not value or value.startswith("/") or ".." in value:
        raise Bad('names under /etc such as "passwd" or "mail/spamassassin"')
    return value


def syscall_name(value: Any) -> str:
    if isinstance(value, str) and NAME_RE.fullmatch(value):
        return value
    raise Bad('syscall names such as "ptrace" or groups such as "@mount"')


def env_name(value: Any) -> str:
    if isinstance(value, str) and _ENV_RE.fullmatch(value):
        return value
    raise Bad("environment variable names")


def descriptor(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 3 <= value < 1024:
        return value
    raise Bad("descriptor numbers from 3 to 1023 (0, 1 and 2 are always handed over)")


def env_map(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise Bad('a table of NAME = "value"')
    for name, text in value.items():
        if not _ENV_RE.fullmatch(name) or not isinstance(text, str) or "\0" in text:
            raise Bad('a table of NAME = "value" (names of letters, digits and _)')
    return tuple(sorted(value.items()))


def uid_spec(value: Any) -> str | int:
    if value in ("pool", "owner"):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 0xFFFFFFFF:
        return value
    raise Bad('"pool", "owner" or a numeric id other than 0')


def id_range(value: Any) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)-(\d+)", value) if isinstance(value, str) else None
    if not match or not 0 < int(match[1]) <= int(match[2]) < 0xFFFFFFFF:
        raise Bad('a range of non-zero ids like "60000-60999"')
    return int(match[1]), int(match[2])



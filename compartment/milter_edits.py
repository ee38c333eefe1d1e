"""What a rewriting filter changed, as milter modifications: only what changed.

Unprivileged (the milter front's user): it reads the filter's output, which the filter (hostile,
perhaps) wrote, so every size is bounded and a malformed header section is an EditError, a
temporary failure, never a guess.  The headers are compared as a sequence (difflib), the body
byte for byte from the two memfds, never read whole into memory.

Header edits come out bottom-up: each one leaves the headers above it as the MTA first showed
them, so every index (an insertion's position, a change's occurrence number among the headers
of its name) is the one the milter saw.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass

HEADER_SECTION_BYTES = 1 << 20
_CHUNK = 32767  # LF text: at most twice that with CRLF, under the protocol's 65535


class EditError(Exception):
    """The filter's output cannot be applied."""


Header = tuple[str, str]  # name, and what follows the colon, as it is (a leading space too)


@dataclass(frozen=True)
class Edit:
    kind: str  # "add" (at the end), "insert" (at index), "change" (index-th of name; "" deletes)
    index: int
    name: str
    value: str


def parse_headers(section: bytes) -> list[Header]:
    """A header section (LF line ends, without the empty line that ends it)."""
    headers: list[Header] = []
    for line in section.decode("utf-8", "surrogateescape").split("\n"):
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line)
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or any(ord(c) <= 32 for c in name):
            raise EditError(f"the filter's output has a header line without a field name: "
                            f"{line[:60]!r}")
        headers.append((name, value))
    return headers


def read_message(fd: int) -> tuple[list[Header], int]:
    """The headers of the message in fd (LF line ends) and the offset of its body."""
    head = os.pread(fd, HEADER_SECTION_BYTES + 2, 0)
    if head.startswith(b"\n"):
        return [], 1
    end = head.find(b"\n\n")
    if end < 0:
        if len(head) > HEADER_SECTION_BYTES:
            raise EditError(f"the filter's output has a header section over "
                            f"{HEADER_SECTION_BYTES} bytes")
        return parse_headers(head.rstrip(b"\n")), len(head)
    return parse_headers(head[:end]), end + 2


def header_edits(old: list[Header], new: list[Header]) -> list[Edit]:
    """The edits that turn old into new, bottom-up."""
    matcher = difflib.SequenceMatcher(None, _keys(old), _keys(new), autojunk=False)
    edits: list[Edit] = []
    for tag, i1, i2, j1, j2 in reversed(matcher.get_opcodes()):
        if tag == "equal":
            continue
        removed, added = old[i1:i2], new[j1:j2]
        if len(removed) == len(added) and all(a[0].lower() == b[0].lower()
                                              for a, b in zip(removed, added, strict=True)):
            edits += [Edit("change", _occurrence(old, i), name, value)
                      for i, (name, value) in reversed(list(zip(range(i1, i2), added,
                                                                strict=True)))]
            continue
        edits += [Edit("change", _occurrence(old, i), old[i][0], "")
                  for i in reversed(range(i1, i2))]
        if i1 == len(old):  # at the end: appended in order
            edits += [Edit("add", 0, name, value) for name, value in added]
        else:  # each at i1, the last first, so that they end in order
            edits += [Edit("insert", i1, name, value) for name, value in reversed(added)]
    return edits


def _keys(headers: list[Header]) -> list[tuple[str, str]]:
    return [(name.lower(), value) for name, value in headers]


def _occurrence(headers: list[Header], index: int) -> int:
    name = headers[index][0].lower()
    return sum(1 for other, _ in headers[:index + 1] if other.lower() == name)


def same_body(fd_a: int, offset_a: int, fd_b: int, offset_b: int) -> bool:
    if os.fstat(fd_a).st_size - offset_a != os.fstat(fd_b).st_size - offset_b:
        return False
    while True:
        a, b = os.pread(fd_a, _CHUNK, offset_a), os.pread(fd_b, _CHUNK, offset_b)
        if a != b:
            return False
        if not a:
            return True
        offset_a, offset_b = offset_a + len(a), offset_b + len(b)


def crlf_chunks(fd: int, offset: int) -> Iterator[bytes]:
    """The body from offset with bare LF made CRLF, in chunks the protocol allows: each ends
    at a line end when it holds one, and never between a CR and its LF."""
    while True:
        data = os.pread(fd, _CHUNK, offset)
        if not data:
            return
        cut = data.rfind(b"\n") + 1
        if 0 < cut < len(data):
            data = data[:cut]
        elif data.endswith(b"\r") and len(data) > 1:
            data = data[:-1]
        offset += len(data)
        yield _crlf(data)


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

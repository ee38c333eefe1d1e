"""The Sendmail milter protocol (version 6, as libmilter and Postfix speak it): packets, the
commands an MTA sends, decoded and checked, and the replies a milter sends, encoded.

Unprivileged (the milter front's user).  A packet is a 32-bit big-endian length, then that many
bytes: a command letter and its data.  Every length and every NUL-terminated field is checked;
anything else is MilterProtocolError, which ends the session (OpenSMTPD's imsg rule: an
unexpected message ends the peer's session, never a guess).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

VERSION = 6
MAX_PACKET_BYTES = (1 << 20) + 1  # libmilter's largest (SMFIP_MDS_1M), and the command byte
CHUNK_BYTES = 65535  # the largest body chunk a milter may send (MILTER_CHUNK_SIZE)

# Actions a milter may take at end of message (SMFIF_*).
ADD_HEADERS, CHANGE_BODY, CHANGE_HEADERS = 0x01, 0x02, 0x10
# Protocol steps (SMFIP_*): what the MTA need not send, what it need not wait a reply for.
NO_CONNECT, NO_HELO, NO_MAIL, NO_RCPT, NO_BODY, NO_HEADERS, NO_EOH = \
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
NR_HEADER, NO_UNKNOWN, NO_DATA = 0x80, 0x100, 0x200
NR_CONNECT, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKNOWN, NR_EOH, NR_BODY = \
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000
HEADER_LEADING_SPACE = 0x100000

# Commands (SMFIC_*) that the MTA sends, and the no-reply flag of each that expects a reply.
ABORT, BODY, CONNECT, MACRO, END_OF_MESSAGE, HELO, QUIT_NEW = b"A", b"B", b"C", b"D", b"E", \
    b"H", b"K"
HEADER, MAIL, END_OF_HEADERS, OPTIONS, QUIT, RCPT, DATA, UNKNOWN = b"L", b"M", b"N", b"O", \
    b"Q", b"R", b"T", b"U"
REPLY_UNLESS = {CONNECT: NR_CONNECT, HELO: NR_HELO, MAIL: NR_MAIL, RCPT: NR_RCPT,
                DATA: NR_DATA, UNKNOWN: NR_UNKNOWN, HEADER: NR_HEADER,
                END_OF_HEADERS: NR_EOH, BODY: NR_BODY}
_COMMANDS = frozenset(b"ABCDEHKLMNOQRTU")

# Replies (SMFIR_*).
ACCEPT, CONTINUE, REPLY_CODE, PROGRESS = b"a", b"c", b"y", b"p"
ADD_HEADER, INSERT_HEADER, CHANGE_HEADER, REPLACE_BODY = b"h", b"i", b"m", b"b"


class MilterProtocolError(Exception):
    """The MTA sent what the protocol does not allow; the session ends."""


@dataclass(frozen=True)
class Command:
    """One decoded command: its letter and its fields (which depend on the letter)."""
    code: bytes
    args: tuple[str, ...] = ()       # NUL-terminated strings (MAIL, RCPT, HELO, HEADER...)
    numbers: tuple[int, ...] = ()    # OPTIONS: version, actions, protocol
    data: bytes = b""                # BODY, END_OF_MESSAGE: raw bytes
    macros: dict[str, str] = field(default_factory=dict)  # MACRO
    stage: bytes = b""               # MACRO: the command the macros are for


def packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def split_packets(buffer: bytearray) -> list[tuple[bytes, bytes]]:
    """Take every whole packet off the front of buffer: [(code, data)]."""
    found = []
    while len(buffer) >= 4:
        (length,) = struct.unpack_from("!I", buffer)
        if not 1 <= length <= MAX_PACKET_BYTES:
            raise MilterProtocolError(f"a packet of {length} bytes (expected 1 to "
                                      f"{MAX_PACKET_BYTES})")
        if len(buffer) < 4 + length:
            break
        found.append((bytes(buffer[4:5]), bytes(buffer[5:4 + length])))
        del buffer[:4 + length]
    return found


def decode(code: bytes, data: bytes) -> Command:
    if len(code) != 1 or code[0] not in _COMMANDS:
        raise MilterProtocolError(f"unknown command {code!r}")
    if code == OPTIONS:
        if len(data) < 12:
            raise MilterProtocolError(f"option negotiation of {len(data)} bytes (expected 12)")
        return Command(code, numbers=struct.unpack_from("!III", data))
    if code == MACRO:
        if not data:
            raise MilterProtocolError("a macro packet without its command letter")
        fields = _strings(data[1:], "macros")
        if len(fields) % 2:
            raise MilterProtocolError("a macro name without its value")
        return Command(code, stage=data[:1], macros=dict(zip(fields[::2], fields[1::2],
                                                             strict=True)))
    if code in (BODY, END_OF_MESSAGE):
        return Command(code, data=data)
    if code == CONNECT:
        return _connect(data)
    if code == HEADER:
        fields = _strings(data, "header")
        if len(fields) != 2 or not fields[0]:
            raise MilterProtocolError("a header packet is a name and a value")
        return Command(code, args=fields)
    if code in (MAIL, RCPT, HELO, UNKNOWN):
        fields = _strings(data, code.decode())
        if not fields:
            raise MilterProtocolError(f"{code.decode()} without an argument")
        return Command(code, args=fields)
    if data:  # ABORT, QUIT, QUIT_NEW, DATA, END_OF_HEADERS carry nothing
        raise MilterProtocolError(f"{len(data)} bytes after command {code.decode()}")
    return Command(code)


def _connect(data: bytes) -> Command:
    """hostname NUL, family ('4', '6', 'L' or 'U'), then (but for 'U') port and address."""
    hostname, nul, rest = data.partition(b"\0")
    if not nul or not rest:
        raise MilterProtocolError("a connect packet without its family")
    family = rest[:1].decode("latin-1")
    if family == "U":
        return Command(CONNECT, args=(_text(hostname), family, "", ""))
    if family not in "46L" or len(rest) < 3:
        raise MilterProtocolError(f"a connect packet of family {family!r}")
    (port,) = struct.unpack_from("!H", rest, 1)
    (address,) = _strings(rest[3:], "connect address") or ("",)
    return Command(CONNECT, args=(_text(hostname), family, str(port), address))


def _strings(data: bytes, what: str) -> tuple[str, ...]:
    """NUL-terminated strings, the last one terminated too."""
    if not data:
        return ()
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: a string without its terminating NUL")
    return tuple(_text(part) for part in data[:-1].split(b"\0"))


def _text(data: bytes) -> str:
    # Header values and addresses may be 8-bit: kept byte for byte through surrogateescape.
    return data.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# --- replies --------------------------------------------------------------------------------

def options_reply(version: int, actions: int, protocol: int) -> bytes:
    return packet(OPTIONS, struct.pack("!III", version, actions, protocol))


def reply_code(text: str) -> bytes:
    """SMFIR_REPLYCODE: "550 5.7.1 text"; the MTA uses it as its SMTP reply."""
    return packet(REPLY_CODE, _bytes(text.replace("%", "%%")) + b"\0")


def add_header(name: str, value: str) -> bytes:
    return packet(ADD_HEADER, _bytes(name) + b"\0" + _bytes(value) + b"\0")


def insert_header(index: int, name: str, value: str) -> bytes:
    return packet(INSERT_HEADER, struct.pack("!I", index) + _bytes(name) + b"\0" +
                  _bytes(value) + b"\0")


def change_header(index: int, name: str, value: str) -> bytes:
    """The index-th (from 1) header called name gets value; an empty value deletes it."""
    return packet(CHANGE_HEADER, struct.pack("!I", index) + _bytes(name) + b"\0" +
                  _bytes(value) + b"\0")


def replace_body(chunk: bytes) -> bytes:
    return packet(REPLACE_BODY, chunk)


def encode_command(command: Command) -> bytes:
    """The packet an MTA would send for command (for the tests' MTA side)."""
    code = command.code
    if code == OPTIONS:
        return packet(code, struct.pack("!III", *command.numbers))
    if code == MACRO:
        flat: Sequence[str] = [s for pair in command.macros.items() for s in pair]
        return packet(code, command.stage + b"".join(_bytes(s) + b"\0" for s in flat))
    if code in (BODY, END_OF_MESSAGE):
        return packet(code, command.data)
    if code == CONNECT:
        hostname, family, port, address = command.args
        tail = b"" if family == "U" else struct.pack("!H", int(port)) + _bytes(address) + b"\0"
        return packet(code, _bytes(hostname) + b"\0" + family.encode() + tail)
    return packet(code, b"".join(_bytes(s) + b"\0" for s in command.args))

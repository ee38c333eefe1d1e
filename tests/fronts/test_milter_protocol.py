"""The milter packet parser and the header edits, without a front: hypothesis properties
(whatever bytes arrive, the parser answers with a command or MilterProtocolError, nothing else;
applying the edits to the old headers gives the new ones) and one case per error message."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compartment import milter_protocol as mp
from compartment.milter_edits import (
    Edit,
    EditError,
    crlf_chunks,
    header_edits,
    parse_headers,
    read_message,
    same_body,
)
from compartment.milter_protocol import Command, MilterProtocolError, decode, encode_command

codes = st.sampled_from(list(b"ABCDEHKLMNOQRTUZx\0"))


@settings(max_examples=2000, deadline=None)
@given(code=codes, data=st.binary(max_size=300))
def test_decode_answers_a_command_or_a_protocol_error(code, data):
    try:
        command = decode(bytes([code]), data)
    except MilterProtocolError:
        return
    assert isinstance(command, Command) and command.code == bytes([code])


@settings(max_examples=1000, deadline=None)
@given(stream=st.binary(max_size=2000))
def test_split_packets_takes_whole_packets_or_refuses(stream):
    buffer = bytearray(stream)
    try:
        found = mp.split_packets(buffer)
    except MilterProtocolError:
        return
    taken = sum(5 + len(data) for _, data in found)
    assert bytes(buffer) == stream[taken:] and len(buffer) < 4 + mp.MAX_PACKET_BYTES


text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
               max_size=40)


@st.composite
def commands(draw) -> Command:
    kind = draw(st.sampled_from("OLMRHDBECTNAQK"))
    code = kind.encode()
    if kind == "O":
        return Command(code, numbers=tuple(draw(st.integers(0, 2**32 - 1)) for _ in range(3)))
    if kind == "L":
        return Command(code, args=(draw(text.filter(bool)), draw(text)))
    if kind in "MRH":
        return Command(code, args=tuple(draw(st.lists(text, min_size=1, max_size=3))))
    if kind == "D":
        return Command(code, stage=draw(st.sampled_from([b"C", b"M", b"E"])),
                       macros=draw(st.dictionaries(text, text, max_size=3)))
    if kind in "BE":
        return Command(code, data=draw(st.binary(max_size=200)))
    if kind == "C":
        family = draw(st.sampled_from("46LU"))
        port = "" if family == "U" else str(draw(st.integers(0, 65535)))
        address = "" if family == "U" else draw(text)
        return Command(code, args=(draw(text), family, port, address))
    return Command(code)


@settings(max_examples=1000, deadline=None)
@given(commands())
def test_what_an_mta_sends_decodes_to_the_same_command(command):
    wire = encode_command(command)
    (code, data), = mp.split_packets(bytearray(wire))
    assert decode(code, data) == command


@pytest.mark.parametrize(("code", "data", "message"), [
    (b"Z", b"", "unknown command"),
    (b"O", b"\0" * 11, "option negotiation of 11 bytes"),
    (b"D", b"", "a macro packet without its command letter"),
    (b"D", b"Cname\0", "a macro name without its value"),
    (b"L", b"Subject\0", "a header packet is a name and a value"),
    (b"L", b"Subject\0x", "a string without its terminating NUL"),
    (b"M", b"", "M without an argument"),
    (b"C", b"host", "a connect packet without its family"),
    (b"C", b"host\0X\0\0", "a connect packet of family 'X'"),
    (b"N", b"x", "1 bytes after command N"),
])
def test_each_decode_error(code, data, message):
    with pytest.raises(MilterProtocolError, match=message):
        decode(code, data)


def test_packet_length_errors():
    for length in (0, mp.MAX_PACKET_BYTES + 1):
        with pytest.raises(MilterProtocolError, match=f"a packet of {length} bytes"):
            mp.split_packets(bytearray(struct.pack("!I", length) + b"A"))


# --- header edits -----------------------------------------------------------------------------

def apply(headers, edits: list[Edit]):
    """The MTA's side: each edit applied in order to the list as it stands then."""
    headers = list(headers)
    for edit in edits:
        if edit.kind == "add":
            headers.append((edit.name, edit.value))
        elif edit.kind == "insert":
            headers.insert(edit.index, (edit.name, edit.value))
        else:
            positions = [i for i, (n, _) in enumerate(headers) if n.lower() == edit.name.lower()]
            position = positions[edit.index - 1]
            if edit.value:
                headers[position] = (headers[position][0], edit.value)
            else:
                del headers[position]
    return headers


header_lists = st.lists(st.tuples(st.sampled_from(["Received", "To", "X-Spam", "Subject"]),
                                  st.sampled_from([" a", " b", " c"])), max_size=8)


@settings(max_examples=1000, deadline=None)
@given(old=header_lists, new=header_lists)
def test_edits_turn_the_old_headers_into_the_new(old, new):
    assert [(n.lower(), v) for n, v in apply(old, header_edits(old, new))] == \
        [(n.lower(), v) for n, v in new]


def test_unchanged_headers_give_no_edit():
    headers = [("To", " a"), ("Subject", " b")]
    assert header_edits(headers, list(headers)) == []


def test_header_section_parsing():
    assert parse_headers(b"A: 1\nB:2\n\tmore") == [("A", " 1"), ("B", "2\n\tmore")]
    with pytest.raises(EditError, match="header line without a field name"):
        parse_headers(b"A: 1\nnot a header")


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("t")
    os.write(fd, data)
    return fd


def test_read_message_and_body_comparison():
    new = _memfd(b"A: 1\n\nbody\n")
    assert read_message(new) == ([("A", " 1")], 6)
    old = _memfd(b"X: 2\nA: 1\n\nbody\n")
    assert same_body(old, 11, new, 6) and not same_body(old, 10, new, 6)
    assert read_message(_memfd(b"\nonly a body\n")) == ([], 1)
    for fd in (new, old):
        os.close(fd)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200_000).map(lambda b: b.replace(b"\r", b"")))
def test_body_chunks_are_crlf_and_within_the_protocol(body):
    fd = _memfd(body)
    chunks = list(crlf_chunks(fd, 0))
    os.close(fd)
    assert all(0 < len(c) <= mp.CHUNK_BYTES for c in chunks)
    assert b"".join(chunks) == body.replace(b"\n", b"\r\n")

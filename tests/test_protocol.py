"""The resident supervisor's wire format: what is accepted, what is refused and why, and that
nothing a peer can send makes the decoder do anything but return a Request or refuse."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compartment import protocol
from compartment.exits import Outcome


def encode(argv=("/bin/cat",), policy="filter", sets=(), fds=(0, 1, 2), env=(), report="",
           flags=0, kind=protocol.RUN) -> bytes:
    return protocol.encode_request(kind, flags, tuple(fds), policy, report, list(argv),
                                   list(env), list(sets))


def test_a_request_round_trips():
    data = encode(["/usr/bin/prog", "a b", "\udcff"], "deliver", ["limits.cpu_seconds=5"],
                  (0, 1, 2, 5), [("SENDER", "a@b"), (b"RAW", b"\xff")], "/var/log/r.jsonl",
                  protocol.CALLER_QMAIL)
    request = protocol.decode_request(data, 4)
    assert request.argv == ("/usr/bin/prog", "a b", "\udcff")
    assert (request.policy, request.report, request.fds) == ("deliver", "/var/log/r.jsonl",
                                                            (0, 1, 2, 5))
    assert request.env == {"SENDER": "a@b", "RAW": "\udcff"}
    assert request.sets == ("limits.cpu_seconds=5",)
    assert request.flags == protocol.CALLER_QMAIL


def test_the_outcomes_are_numbered_as_exits_names_them():
    assert tuple(str(outcome) for outcome in Outcome) == protocol.OUTCOMES


# One test per refusal message of the decoder.
REFUSALS = [
    (b"short", 3, "shorter than its header"),
    (b"XXXX" + encode()[4:], 3, "bad magic"),
    (encode()[:4] + b"\0\x09" + encode()[6:], 3, "protocol version 9"),
    (encode(kind=7), 3, "unknown request kind 7"),
    (encode(flags=1 << 7), 3, "unknown flags 0x80"),
    (encode(flags=protocol.AGENT_QMAIL), 3, "without the flag that gives it"),
    (encode(), 2, "lists 3 descriptors but 2 came"),
    (encode()[:30], 3, "shorter than its table of lengths"),
    (encode() + b"x", 3, "lengths add up"),
    (encode(fds=(1, 0, 2)), 3, "the first three must be 0, 1 and 2"),
    (encode(fds=(0, 1, 2, 4, 3)), 5, "distinct, ascending"),
    (encode(fds=(0, 1, 2, 2000)), 4, "from 3 to 1023"),
    (encode(policy=""), 3, "the policy must be a name"),
    (encode(policy="Filter"), 3, "the policy must be a name"),
    (encode(policy="-p"), 3, "the policy must be a name"),
    (encode(policy="a" * 65), 3, "the policy must be a name"),
    (encode(report="relative/r.jsonl"), 3, "must be absolute"),
    (encode(argv=["/bin/a\0b"]), 3, "contains a NUL byte"),
    (encode(env=[("1X", "v")]), 3, "is not a name"),
    (encode(env=[("A", "1"), ("A", "2")]), 3, "given twice"),
    (encode(env=[("A", "x\0y")]), 3, "contains a NUL byte"),
    (encode(sets=[b"\xff=x".decode("latin-1")]), 3, None),  # latin-1 ÿ is valid UTF-8 text
    (encode(sets=["=x"]), 3, "expected KEY=VALUE"),
    (encode(argv=[]), 3, "no program given"),
    (encode(kind=protocol.STATUS, argv=[], fds=(), policy=""), 3, "lists 0 descriptors"),
    (encode(kind=protocol.STATUS, argv=[], fds=(0, 1, 2), policy=""), 3,
     "a status request carries no descriptors"),
    (encode(kind=protocol.STATUS, argv=[], fds=(), policy="filter"), 0, "names no policy"),
    (encode(kind=protocol.STATUS, argv=["x"], fds=(), policy=""), 0, "carries no program"),
]


@pytest.mark.parametrize(("data", "received", "message"), REFUSALS)
def test_each_refusal_names_what_is_wrong(data, received, message):
    if message is None:
        protocol.decode_request(data, received)  # accepted
        return
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.decode_request(data, received)


def test_counts_past_their_bounds_are_refused():
    header = struct.Struct("!4sHHIHHHH")
    for index, bound in ((4, protocol.MAX_FDS), (5, protocol.MAX_ARGV), (6, protocol.MAX_ENV),
                         (7, protocol.MAX_SETS)):
        fields = [b"CMPQ", 1, 1, 0, 3, 1, 0, 0]
        fields[index] = bound + 1
        with pytest.raises(protocol.ProtocolError, match=f"more than {bound}"):
            protocol.decode_request(header.pack(*fields) + b"\0" * 64, fields[4])
    with pytest.raises(protocol.ProtocolError, match="larger than"):
        protocol.decode_request(b"\0" * (protocol.MAX_REQUEST_BYTES + 1), 3)


def test_the_client_refuses_what_the_daemon_would():
    with pytest.raises(protocol.ProtocolError, match="at most"):
        encode(argv=["/bin/x"] + ["a" * 60000] * 3)
    with pytest.raises(protocol.ProtocolError, match="longer than 65535"):
        encode(argv=["a" * 70000])
    with pytest.raises(protocol.ProtocolError, match="at most 1024"):
        encode(env=[(f"V{i}", "") for i in range(1025)])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512), st.integers(0, 20))
def test_random_bytes_are_refused_or_decoded_never_anything_else(data, received):
    try:
        protocol.decode_request(data, received)
    except protocol.ProtocolError:
        return


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=8), st.data())
def test_mutations_of_a_valid_request_are_refused_or_decoded(argv, data):
    raw = bytearray(encode(argv=argv))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        request = protocol.decode_request(bytes(raw[:cut]), 3)
    except protocol.ProtocolError:
        return
    assert request.argv and all("\0" not in arg for arg in request.argv)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5),
       st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
                       st.text(max_size=20).filter(lambda v: "\0" not in v), max_size=5))
def test_what_the_client_encodes_the_daemon_decodes(argv, env):
    argv = [arg.replace("\0", "") or "x" for arg in argv]
    request = protocol.decode_request(encode(argv=argv, env=env.items()), 3)
    assert (list(request.argv), request.env) == (argv, env)


def test_a_result_round_trips():
    fields = {"outcome": "violation", "exit_status": 75, "reason": "seccomp violation",
              "program": "/bin/x", "uid": 60001, "agent_status": None, "agent_signal": 9,
              "denied_syscall": "socket", "cpu_s": 0.012345, "wall_s": 1.5,
              "peak_memory_bytes": 1 << 24, "bytes_in": None, "bytes_out": 7,
              "stderr": b"4.7.0 compartment: seccomp violation\n"}
    kind, answer = protocol.decode_answer(protocol.encode_result(fields))
    assert kind == protocol.RESULT
    assert answer == {**fields, "refused": False}


def test_answers_that_are_not_are_refused():
    for data in (b"", b"CMPA\0\x01\0\x02", b"CMPA\0\x02\0\x01\0\0\0\x01",
                 protocol.encode_accepted(1.0) + b"x", protocol.encode_status("x")[:-1]):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode_answer(data)

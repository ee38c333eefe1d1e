"""The resident supervisor's wire format: one request, then one or two answers (docs/protocol.md).

Both sides import this module: the `submit` client (unprivileged, which must start fast: only
the C half of struct is imported) and the daemon (root, where decode_request is the only code
that reads what a peer sent).  Every message is one SOCK_SEQPACKET datagram: a fixed header,
a table of lengths, then the bytes those lengths describe — no delimiters, no escapes, nothing
optional.  Decoding checks the magic, the version, the kind, every flag bit, every count and
length against a bound, that the lengths add up to exactly what was received, and each field's
form; anything else is a ProtocolError naming what was wrong, and the request is refused.
"""

from __future__ import annotations

import _struct  # struct's C half: struct.py itself costs the client's start a quarter millisecond

TYPE_CHECKING = False  # not typing's: importing typing costs the client 1.5 ms
if TYPE_CHECKING:
    from typing import Any

VERSION = 1
MAX_REQUEST_BYTES = 128 << 10
MAX_ANSWER_BYTES = 16 << 10
MAX_PATH = 4096
MAX_ARGV = 1024
MAX_ENV = 1024
MAX_SETS = 64
MAX_FDS = 16  # 0, 1, 2 and up to 13 the policy passes
MAX_POLICY_NAME = 64
MAX_FD_NUMBER = 1023

RUN, STATUS = 1, 2  # request kinds
ACCEPTED, RESULT, STATUS_TEXT = 1, 2, 3  # answer kinds

# Request flags.
CALLER_QMAIL = 1 << 0  # the caller speaks qmail's exit codes (--exit-codes qmail)
AGENT_GIVEN = 1 << 1  # --agent-exit-codes was given ...
AGENT_QMAIL = 1 << 2  # ... and it is qmail (else sysexits)
_REQUEST_FLAGS = CALLER_QMAIL | AGENT_GIVEN | AGENT_QMAIL

# Result flags: which of the optional numbers are present; a refusal (nothing was run: the
# client writes the reason line in its caller's convention).
HAS_UID, HAS_AGENT_STATUS, HAS_AGENT_SIGNAL, HAS_BYTES_IN, REFUSED = 1, 2, 4, 8, 16

# The outcomes by number, in the order of compartment.exits.Outcome (a test holds them equal).
OUTCOMES = ("ok", "agent-failed", "timeout", "cpu-limit", "memory-limit", "output-limit",
            "violation", "signal", "config-error", "internal-error")

# magic, version, kind, flags, descriptors, argv entries, environment pairs, --set items
_REQUEST = _struct.Struct("!4sHHIHHHH")
_REQUEST_MAGIC = b"CMPQ"
# magic, version, kind
_ANSWER = _struct.Struct("!4sHH")
_ANSWER_MAGIC = b"CMPA"
_ACCEPTED = _struct.Struct("!I")  # the compartment's wall-clock timeout, in milliseconds
# outcome, flags, exit status, agent status, agent signal, uid, cpu µs, wall µs, peak memory,
# bytes in, bytes out; then the lengths of reason, program, denied syscall, stderr text
_RESULT = _struct.Struct("!BBHHHIQQQQQHHHH")
_TEXTS = (("reason", 2048), ("program", MAX_PATH), ("denied_syscall", 128), ("stderr", 4096))
_STATUS = _struct.Struct("!I")


class ProtocolError(Exception):
    """A message that is not what this version of the protocol allows; says what is wrong."""


class Request:
    """A decoded request; every field checked for form, none yet for permission."""

    __slots__ = ("kind", "flags", "fds", "policy", "report", "argv", "env", "sets")

    def __init__(self, kind: int, flags: int, fds: tuple[int, ...], policy: str, report: str,
                 argv: tuple[str, ...], env: dict[str, str], sets: tuple[str, ...]) -> None:
        self.kind, self.flags, self.fds, self.policy = kind, flags, fds, policy
        self.report, self.argv, self.env, self.sets = report, argv, env, sets


def encode_request(kind: int, flags: int, fds: tuple[int, ...], policy: str, report: str,
                   argv: list[str], env: list[tuple[str | bytes, str | bytes]],
                   sets: list[str]) -> bytes:
    """The client's request; raises ProtocolError for what the daemon would refuse anyway.
    report: an absolute path the daemon appends the report line to as the peer, or ""."""
    strings = [policy.encode(), _fs(report), *(_fs(arg) for arg in argv)]
    for name, value in env:
        strings += [_fs(name), _fs(value)]
    strings += [item.encode() for item in sets]
    counts = (len(fds), len(argv), len(env), len(sets))
    for count, bound, what in zip(counts, (MAX_FDS, MAX_ARGV, MAX_ENV, MAX_SETS),
                                  ("descriptors", "arguments", "environment variables",
                                   "--set items"), strict=True):
        if count > bound:
            raise ProtocolError(f"{count} {what}: the protocol takes at most {bound}")
    if any(len(s) > 0xFFFF for s in strings):
        raise ProtocolError("an argument, variable or --set item is longer than 65535 bytes")
    header = _REQUEST.pack(_REQUEST_MAGIC, VERSION, kind, flags, *counts)
    table = _struct.pack(f"!{len(fds)}H{len(strings)}H", *fds, *map(len, strings))
    data = header + table + b"".join(strings)
    if len(data) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"the request is {len(data)} bytes (arguments and environment): "
                            f"the protocol takes at most {MAX_REQUEST_BYTES}")
    return data


def decode_request(data: bytes, received_fds: int) -> Request:
    """The daemon's side: check everything the peer sent, field by field."""
    if len(data) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request larger than {MAX_REQUEST_BYTES} bytes")
    if len(data) < _REQUEST.size:
        raise ProtocolError(f"request of {len(data)} bytes, shorter than its header")
    magic, version, kind, flags, nfds, nargv, nenv, nsets = _REQUEST.unpack_from(data)
    if magic != _REQUEST_MAGIC:
        raise ProtocolError("not a compartment request (bad magic)")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}; this daemon speaks {VERSION}")
    if kind not in (RUN, STATUS):
        raise ProtocolError(f"unknown request kind {kind}")
    if flags & ~_REQUEST_FLAGS:
        raise ProtocolError(f"unknown flags {flags & ~_REQUEST_FLAGS:#x}")
    if flags & AGENT_QMAIL and not flags & AGENT_GIVEN:
        raise ProtocolError("agent convention flag without the flag that gives it")
    for count, bound, what in ((nfds, MAX_FDS, "descriptors"), (nargv, MAX_ARGV, "arguments"),
                               (nenv, MAX_ENV, "environment pairs"), (nsets, MAX_SETS, "sets")):
        if count > bound:
            raise ProtocolError(f"{count} {what}, more than {bound}")
    if nfds != received_fds:
        raise ProtocolError(f"the request lists {nfds} descriptors but {received_fds} came")
    nstrings = 2 + nargv + 2 * nenv + nsets
    table = _struct.Struct(f"!{nfds}H{nstrings}H")
    if len(data) < _REQUEST.size + table.size:
        raise ProtocolError("request shorter than its table of lengths")
    numbers = table.unpack_from(data, _REQUEST.size)
    fds, lengths = numbers[:nfds], numbers[nfds:]
    if _REQUEST.size + table.size + sum(lengths) != len(data):
        raise ProtocolError(f"the lengths add up to {sum(lengths)} bytes of strings, but "
                            f"{len(data) - _REQUEST.size - table.size} came")
    strings = _split(data, _REQUEST.size + table.size, lengths)
    env_at, sets_at = 2 + nargv, 2 + nargv + 2 * nenv
    request = Request(kind, flags, _check_fds(fds, kind), _policy_name(strings[0], kind),
                      _report_path(strings[1]),
                      tuple(_text(s, "argument") for s in strings[2:env_at]),
                      _environment(strings[env_at:sets_at]),
                      tuple(_set_item(s) for s in strings[sets_at:]))
    if kind == RUN and not request.argv:
        raise ProtocolError("no program given")
    if kind == STATUS and (request.argv or request.env or request.sets or request.report):
        raise ProtocolError("a status request carries no program, environment, --set or report")
    return request


def _split(data: bytes, offset: int, lengths: tuple[int, ...]) -> list[bytes]:
    out = []
    for length in lengths:
        out.append(data[offset:offset + length])
        offset += length
    return out


def _check_fds(fds: tuple[int, ...], kind: int) -> tuple[int, ...]:
    if kind == STATUS:
        if fds:
            raise ProtocolError("a status request carries no descriptors")
        return fds
    if fds[:3] != (0, 1, 2):
        raise ProtocolError(f"descriptors {list(fds)}: the first three must be 0, 1 and 2")
    extra = fds[3:]
    if list(extra) != sorted(set(extra)) or any(not 3 <= fd <= MAX_FD_NUMBER for fd in extra):
        raise ProtocolError(f"descriptors {list(fds)}: extra ones must be distinct, ascending, "
                            f"from 3 to {MAX_FD_NUMBER}")
    return fds


def _policy_name(raw: bytes, kind: int) -> str:
    if kind == STATUS:
        if raw:
            raise ProtocolError("a status request names no policy")
        return ""
    ok = 0 < len(raw) <= MAX_POLICY_NAME and all(c in _NAME_BYTES for c in raw)
    if not ok or raw.startswith(b"-"):
        raise ProtocolError("the policy must be a name of letters a-z, digits, - and _ "
                            f"(up to {MAX_POLICY_NAME}): a peer names a policy, never sends one")
    return raw.decode()


_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
_ENV_FIRST = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_ENV_REST = _ENV_FIRST | frozenset(b"0123456789")


def _report_path(raw: bytes) -> str:
    if raw and (not raw.startswith(b"/") or len(raw) > MAX_PATH):
        raise ProtocolError(f"the report path must be absolute and at most {MAX_PATH} bytes")
    return _text(raw, "report path")


def _text(raw: bytes, what: str) -> str:
    """argv and environment values are bytes to the kernel; kept so through surrogateescape."""
    if b"\0" in raw:
        raise ProtocolError(f"an {what} contains a NUL byte")
    return raw.decode("utf-8", "surrogateescape")


def _environment(raw: list[bytes]) -> dict[str, str]:
    env: dict[str, str] = {}
    for name, value in zip(raw[::2], raw[1::2], strict=True):
        if not name or name[0] not in _ENV_FIRST or not set(name) <= _ENV_REST:
            raise ProtocolError(f"environment variable name {name[:64]!r} is not a name")
        if name.decode() in env:
            raise ProtocolError(f"environment variable {name.decode()} given twice")
        env[name.decode()] = _text(value, "environment value")
    return env


def _set_item(raw: bytes) -> str:
    try:
        item = raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError("a --set item is not UTF-8") from None
    key, sep, _ = item.partition("=")
    if not sep or not key or "\0" in item:
        raise ProtocolError(f"--set {item[:64]!r}: expected KEY=VALUE")
    return item


def _fs(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


# Answers: the daemon encodes, the client decodes (and checks: a daemon's bug must not become a
# delivery the client reports as done).

def encode_accepted(wall_timeout_s: float) -> bytes:
    return _ANSWER.pack(_ANSWER_MAGIC, VERSION, ACCEPTED) + _ACCEPTED.pack(
        min(int(wall_timeout_s * 1000) + 1, 0xFFFFFFFF))


def encode_result(result: dict[str, Any]) -> bytes:
    """A run's end: a Result's fields (dataclasses.asdict) and "stderr", the caller's text."""
    flags = sum(bit for bit, name in ((HAS_UID, "uid"), (HAS_AGENT_STATUS, "agent_status"),
                                      (HAS_AGENT_SIGNAL, "agent_signal"),
                                      (HAS_BYTES_IN, "bytes_in")) if result[name] is not None)
    flags |= REFUSED if result.get("refused") else 0
    texts = []
    for name, bound in _TEXTS:
        value = result[name] or ""
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
        texts.append(raw[:bound])
    fixed = _RESULT.pack(OUTCOMES.index(str(result["outcome"])), flags, result["exit_status"],
                         result["agent_status"] or 0, result["agent_signal"] or 0,
                         result["uid"] or 0, round(result["cpu_s"] * 1e6),
                         round(result["wall_s"] * 1e6), result["peak_memory_bytes"],
                         result["bytes_in"] or 0, result["bytes_out"], *map(len, texts))
    return _ANSWER.pack(_ANSWER_MAGIC, VERSION, RESULT) + fixed + b"".join(texts)


def encode_status(text: str) -> bytes:
    raw = text.encode()[:MAX_ANSWER_BYTES - _ANSWER.size - _STATUS.size]
    return _ANSWER.pack(_ANSWER_MAGIC, VERSION, STATUS_TEXT) + _STATUS.pack(len(raw)) + raw


def decode_answer(data: bytes) -> tuple[int, Any]:
    """(ACCEPTED, timeout ms) | (RESULT, dict of the result's fields) | (STATUS_TEXT, text)."""
    if len(data) < _ANSWER.size:
        raise ProtocolError(f"answer of {len(data)} bytes, shorter than its header")
    magic, version, kind = _ANSWER.unpack_from(data)
    if magic != _ANSWER_MAGIC or version != VERSION:
        raise ProtocolError("not an answer of this protocol version (bad magic or version)")
    body = data[_ANSWER.size:]
    if kind == ACCEPTED and len(body) == _ACCEPTED.size:
        return kind, _ACCEPTED.unpack(body)[0]
    if kind == STATUS_TEXT and len(body) >= _STATUS.size and \
            _STATUS.unpack_from(body)[0] == len(body) - _STATUS.size:
        return kind, body[_STATUS.size:].decode(errors="replace")
    if kind == RESULT and len(body) >= _RESULT.size:
        return kind, _result(body)
    raise ProtocolError(f"malformed answer of kind {kind} ({len(data)} bytes)")


def _result(body: bytes) -> dict[str, Any]:
    (outcome, flags, exit_status, agent_status, agent_signal, uid, cpu_us, wall_us, peak,
     bytes_in, bytes_out, *lengths) = _RESULT.unpack_from(body)
    if outcome >= len(OUTCOMES) or _RESULT.size + sum(lengths) != len(body):
        raise ProtocolError("malformed result (outcome or lengths)")
    reason, program, denied, stderr_text = _split(body, _RESULT.size, tuple(lengths))
    return {"outcome": OUTCOMES[outcome], "exit_status": exit_status,
            "reason": reason.decode(errors="replace"),
            "program": program.decode("utf-8", "surrogateescape"),
            "uid": uid if flags & HAS_UID else None,
            "agent_status": agent_status if flags & HAS_AGENT_STATUS else None,
            "agent_signal": agent_signal if flags & HAS_AGENT_SIGNAL else None,
            "denied_syscall": denied.decode(errors="replace") or None,
            "cpu_s": cpu_us / 1e6, "wall_s": wall_us / 1e6, "peak_memory_bytes": peak,
            "bytes_in": bytes_in if flags & HAS_BYTES_IN else None, "bytes_out": bytes_out,
            "stderr": stderr_text, "refused": bool(flags & REFUSED)}

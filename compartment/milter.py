"""compartment milter: a milter whose filter runs in a compartment at the end of each message.

    compartment milter --listen unix:PATH|inet:PORT@HOST|systemd [-p POLICY] [--set ...]...
                       [--rewrite] [OPTIONS] -- FILTER [ARG...]

Unprivileged: the front's own system user (compartment-milter) speaks the milter protocol
(compartment.milter_protocol, pure Python on asyncio) and spools each message once into a memfd:
the headers as received, an empty line, the body, with LF line ends.  At the end of the message
it asks the resident supervisor to run FILTER with that memfd, sealed, on stdin, and the
envelope in SENDER, RECIPIENT (when there is one), CLIENT_ADDRESS, CLIENT_HOSTNAME, CLIENT_HELO
and QUEUE_ID.  The filter's exit status decides: success accepts; a permanent status (65, 67,
68, 69, 77) rejects with 5.x.x (the filter's first stderr line when it starts with one); every
other outcome, the supervisor unreachable included, tempfails with 4.x.x — or, when the policy
says filter.on_failure = "pass", lets the message through unchanged, logged as such.

With --rewrite the filter's stdout is the new message: the headers that changed become milter
header edits, a changed body a body replacement (compartment.milter_edits), each only when the
MTA negotiated that action.  A header-only filter (spamassassin -L with report_safe 0) sends no
body back.  Without --rewrite the stdout is thrown away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compartment import milter_protocol as mp
from compartment.exits import Verdict
from compartment.fronts import (
    Front,
    FrontError,
    MailLog,
    Reply,
    Runner,
    Spool,
    capture,
    first_line,
    queue_id,
    reply_for,
)
from compartment.milter_edits import (
    EditError,
    Header,
    crlf_chunks,
    header_edits,
    read_message,
    same_body,
)

if TYPE_CHECKING:
    from compartment.report import Result

PROGRESS_S = 30.0  # while a filter runs: tells the MTA we are alive (its content timeout)
WANTED_PROTOCOL = (mp.NO_UNKNOWN | mp.NO_DATA | mp.NR_CONNECT | mp.NR_HELO | mp.NR_MAIL |
                   mp.NR_RCPT | mp.NR_DATA | mp.NR_UNKNOWN | mp.NR_EOH | mp.NR_HEADER |
                   mp.HEADER_LEADING_SPACE)
REWRITE_ACTIONS = mp.ADD_HEADERS | mp.CHANGE_HEADERS | mp.CHANGE_BODY
TOO_BIG = "552 5.3.4 message too big for the filter"


@dataclass
class Settings:
    runner: Runner
    rewrite: bool
    on_failure: str  # the policy's filter.on_failure: "defer" or "pass"
    message_bytes: int
    idle_timeout_s: float


class Message:
    """One message of a session: its envelope, its spool, its headers as received."""

    def __init__(self, sender: str) -> None:
        self.sender = sender
        self.recipients: list[str] = []
        self.spool = Spool()
        self.headers: list[Header] = []
        self.body_offset: int | None = None
        self.pending_cr = False
        self.too_big = False  # past --max-message-bytes: no longer spooled, refused

    def header(self, name: str, value: str, leading_space: bool) -> None:
        value = value.replace("\r\n", "\n")
        raw = value if leading_space else " " + value
        self.headers.append((name, raw))
        self.spool.write(f"{name}:{raw}\n".encode("utf-8", "surrogateescape"))

    def end_of_headers(self) -> None:
        if self.body_offset is None:
            self.spool.write(b"\n")
            self.body_offset = self.spool.size

    def body(self, chunk: bytes) -> None:
        """Append body bytes, CRLF made LF across chunk boundaries."""
        self.end_of_headers()
        data = (b"\r" if self.pending_cr else b"") + chunk
        self.pending_cr = data.endswith(b"\r")
        self.spool.write((data[:-1] if self.pending_cr else data).replace(b"\r\n", b"\n"))

    def close(self) -> None:
        self.spool.close()


class Connection:
    """One MTA connection: the protocol's state machine, one message at a time."""

    def __init__(self, front: Front, settings: Settings, writer: asyncio.StreamWriter) -> None:
        self.front, self.settings, self.writer = front, settings, writer
        self.busy = False
        self.protocol = self.actions = 0
        self.macros: dict[str, str] = {}
        self.client: dict[str, str] = {}
        self.message: Message | None = None

    def close(self) -> None:
        self.writer.close()

    async def run(self, reader: asyncio.StreamReader) -> None:
        buffer = bytearray()
        while True:
            data = await asyncio.wait_for(reader.read(65536), self.settings.idle_timeout_s)
            if not data:
                return
            buffer += data
            for code, payload in mp.split_packets(buffer):
                command = mp.decode(code, payload)
                if command.code == mp.QUIT:
                    return
                for reply in await self.handle(command):
                    self.writer.write(reply)
                await self.writer.drain()
                if self.front.stopping and not self.busy and self.message is None:
                    return

    async def handle(self, command: mp.Command) -> list[bytes]:
        code = command.code
        if code == mp.OPTIONS:
            return [self.negotiate(*command.numbers)]
        if code == mp.MACRO:
            self.macros.update(command.macros)
            return []
        if code in (mp.ABORT, mp.QUIT_NEW):
            self.end_message()
            if code == mp.QUIT_NEW:
                self.macros, self.client = {}, {}
            return []
        if code == mp.END_OF_MESSAGE:
            return await self.end_of_message(command.data)
        refusal = self.take(command)
        if refusal:
            return [mp.reply_code(refusal)]
        return [] if self.protocol & mp.REPLY_UNLESS.get(code, 0) else [mp.packet(mp.CONTINUE)]

    def negotiate(self, version: int, actions: int, protocol: int) -> bytes:
        if version < 2:
            raise mp.MilterProtocolError(f"milter protocol version {version}")
        self.actions = actions & (REWRITE_ACTIONS if self.settings.rewrite else 0)
        self.protocol = protocol & WANTED_PROTOCOL
        return mp.options_reply(min(version, mp.VERSION), self.actions, self.protocol)

    def take(self, command: mp.Command) -> str:
        """Take in a command of the SMTP dialogue; a reply text when it is refused."""
        code, args = command.code, command.args
        if code == mp.CONNECT:
            self.client = {"CLIENT_HOSTNAME": args[0], "CLIENT_ADDRESS": args[3]}
        elif code == mp.HELO:
            self.client["CLIENT_HELO"] = args[0]
        elif code == mp.MAIL:
            self.end_message()
            self.message = Message(args[0].strip("<>"))
        elif code == mp.RCPT and self.message is not None:
            self.message.recipients.append(args[0].strip("<>"))
        elif code in (mp.HEADER, mp.END_OF_HEADERS, mp.BODY):
            message = self.message = self.message or Message("")
            if not message.too_big:
                self._spool(message, command)
                message.too_big = message.spool.size > self.settings.message_bytes
            # Said at the first command the MTA waits a reply for (a header or the end of the
            # headers may be one it does not: a reply there would put the dialogue out of step).
            if message.too_big and not self.protocol & mp.REPLY_UNLESS.get(code, 0):
                return TOO_BIG
        return ""

    def _spool(self, message: Message, command: mp.Command) -> None:
        if command.code == mp.HEADER:
            name, value = command.args
            message.header(name, value, bool(self.protocol & mp.HEADER_LEADING_SPACE))
        elif command.code == mp.END_OF_HEADERS:
            message.end_of_headers()
        else:
            message.body(command.data)

    def end_message(self) -> None:
        if self.message is not None:
            self.message.close()
            self.message = None

    async def end_of_message(self, chunk: bytes) -> list[bytes]:
        message, self.message = self.message or Message(""), None
        qid = self.macros.get("i") or queue_id()
        if message.too_big:
            message.close()
            self.front.log.info(f"{qid}: from=<{message.sender}>, size>"
                                f"{self.settings.message_bytes}, action=reject ({TOO_BIG})")
            return [mp.reply_code(TOO_BIG)]
        started = time.monotonic()
        self.busy = True
        try:
            message.body(chunk)
            if message.pending_cr:
                message.spool.write(b"\r")
            message.spool.seal()
            result, reply, edits = await self._filtered(message)
        finally:
            self.busy = False
            message.close()
        action, replies = self._decide(result, reply, edits)
        self.front.log.info(
            f"{qid}: from=<{message.sender}>, nrcpt={len(message.recipients)}, "
            f"size={message.spool.size}, delay={time.monotonic() - started:.2f}, "
            f"outcome={result.outcome}, edits={len(replies) - 1}, action={action} ({reply})")
        return replies

    async def _filtered(self, message: Message) -> tuple[Result, Reply, list[bytes] | EditError]:
        """Run the filter (telling the MTA we are alive meanwhile): its Result, the reply
        it stands for, and the edits its output asks for (or why they cannot be made)."""
        env = {**self.client, "SENDER": message.sender, "QUEUE_ID": self.macros.get("i", "")}
        if len(message.recipients) == 1:
            env["RECIPIENT"] = message.recipients[0]
        stdin, stdout = message.spool.reader(), capture()
        try:
            task = asyncio.ensure_future(self.front.call(self._run, env, stdin, stdout))
            while not (await asyncio.wait({task}, timeout=PROGRESS_S))[0]:
                self.writer.write(mp.packet(mp.PROGRESS))
                await self.writer.drain()
            result, said = await task
            reply = reply_for(result, said, "accepted")
            edits: list[bytes] | EditError = []
            if reply.kind is Verdict.SUCCESS and self.settings.rewrite:
                try:
                    edits = self._edits(message, stdout)
                except EditError as err:
                    edits = err
            return result, reply, edits
        finally:
            os.close(stdout)

    def _run(self, env: dict[str, str], stdin: int, stdout: int) -> tuple[Result, str]:
        """In a worker thread: one run, and the first line it wrote on stderr."""
        stderr = capture()
        try:
            result = self.settings.runner.run({}, env, stdin, stdout, stderr)
            return result, first_line(stderr)
        finally:
            os.close(stdin)
            os.close(stderr)

    def _edits(self, message: Message, output: int) -> list[bytes]:
        if os.fstat(output).st_size == 0:
            raise EditError("the filter wrote an empty message")
        headers, body_offset = read_message(output)
        edits = header_edits(message.headers, headers)
        packets = [self._header_packet(edit.kind, edit.index, edit.name, edit.value)
                   for edit in edits]
        assert message.body_offset is not None  # end_of_message saw the headers end
        if not same_body(message.spool.fd, message.body_offset, output, body_offset):
            if not self.actions & mp.CHANGE_BODY:
                raise EditError("the filter changed the body; the MTA did not negotiate "
                                "body replacement")
            packets += [mp.replace_body(chunk) for chunk in crlf_chunks(output, body_offset)]
        return packets

    def _header_packet(self, kind: str, index: int, name: str, value: str) -> bytes:
        need = mp.CHANGE_HEADERS if kind == "change" else mp.ADD_HEADERS
        if not self.actions & need:
            raise EditError(f"the filter changed header {name}; the MTA did not negotiate "
                            f"{'header changes' if kind == 'change' else 'added headers'}")
        if not self.protocol & mp.HEADER_LEADING_SPACE and value[:1] in (" ", "\t"):
            value = value[1:]  # the MTA puts one space after the colon itself
        if kind == "add":
            return mp.add_header(name, value)
        if kind == "insert":
            return mp.insert_header(index + self._unseen_headers(), name, value)
        return mp.change_header(index, name, value)

    def _unseen_headers(self) -> int:
        """Headers above the first one the milter saw that an insertion's index counts: Postfix
        shows milters no Received header of its own but counts it (index 0 is above it)."""
        return 1 if self.macros.get("v", "").startswith("Postfix") else 0

    def _decide(self, result: Result, reply: Reply, edits: list[bytes] | EditError
                ) -> tuple[str, list[bytes]]:
        """(what was done, the replies to the end of the message)."""
        failed = reply.kind is Verdict.TEMPORARY or isinstance(edits, EditError)
        if isinstance(edits, EditError):
            reply = Reply(Verdict.TEMPORARY, "451", "4.3.0", str(edits))
        if reply.kind is Verdict.SUCCESS:
            return "accept", [*edits, mp.packet(mp.CONTINUE)]  # type: ignore[misc]
        if failed and self.settings.on_failure == "pass":
            return "pass-unfiltered", [mp.packet(mp.CONTINUE)]
        action = "reject" if reply.kind is Verdict.PERMANENT else "tempfail"
        return action, [mp.reply_code(str(reply))]


async def serve_connection(front: Front, settings: Settings, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername") or "unix"
    if front.full() or front.stopping:
        front.log.warning(f"refused a connection from {peer}: {len(front.sessions)} "
                          "sessions already, or stopping")
        writer.close()
        return
    connection = Connection(front, settings, writer)
    front.sessions.add(connection)
    try:
        await connection.run(reader)
    except mp.MilterProtocolError as err:
        front.log.warning(f"protocol error from {peer}: {err}; connection closed")
    except (TimeoutError, ConnectionError) as err:
        front.log.warning(f"connection from {peer} ended: {type(err).__name__}")
    finally:
        front.sessions.discard(connection)
        connection.end_message()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def prepare(options: argparse.Namespace, runner: Runner, log: MailLog
            ) -> Callable[[socket.socket, str], Awaitable[None]]:
    """The daemon, from compartment milter's options (raises FrontError)."""
    settings = Settings(runner, options.rewrite, _on_failure(options), options.max_message_bytes,
                        options.idle_timeout_s)

    def reload() -> None:
        settings.on_failure = _on_failure(options)

    front = Front(log, options.max_sessions, options.max_runs, reload=reload,
                  drain_s=options.drain_timeout_s)

    async def serve(sock: socket.socket, ready: str) -> None:
        server = await asyncio.start_server(
            lambda r, w: serve_connection(front, settings, r, w), sock=sock)
        await front.serve(server, ready)
    return serve


def _on_failure(options: argparse.Namespace) -> str:
    from compartment.policy import Policy, PolicyError

    try:
        return Policy.load(options.policy, options.set).filter.on_failure
    except PolicyError as err:
        raise FrontError(f"policy: {err}") from None

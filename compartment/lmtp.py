"""compartment lmtp: an LMTP delivery server whose every delivery runs in a compartment.

    compartment lmtp --listen unix:PATH|HOST:PORT|systemd -p POLICY [--set KEY=VALUE]...
                     [--recipients passwd|passwd:TEMPLATE|map:PATH] [limits] -- PROGRAM [ARG...]

Unprivileged: the front's own system user (compartment-lmtp) speaks LMTP (RFC 2033) with
aiosmtpd and asks the resident supervisor for one run per recipient after DATA, the message on
stdin as a sealed memfd and the envelope in SENDER, RECIPIENT, LOCAL, DOMAIN, ORIGINAL_RECIPIENT
(USER for a passwd recipient, EXTENSION for an address extension), as qmail-local and Postfix
local(8) set them.  PROGRAM's items and the --set values may hold placeholders ({local},
{domain}, {recipient}, {sender}, {extension}, {mailbox}; --set values only {mailbox}), each
replaced inside its own argv item, never through a shell.

What aiosmtpd does with the message: it gathers DATA as a list of lines (bytearrays) and joins
them into one bytes object, which its smtp_DATA holds until our handler returns; past the SIZE
limit it stops keeping lines.  So a message is in the front's memory once (twice while being
joined) until its replies are sent.  The front copies it once, CRLF made LF, into a memfd,
sealed, of which each recipient's run gets its own read-only open.

aiosmtpd has no per-recipient reply after DATA (aio-libs/aiosmtpd#517): the handler returns
the replies as one multi-line string, which push() sends as it is, one line per recipient.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope
from aiosmtpd.smtp import Session as SmtpSession

from compartment.exits import Verdict
from compartment.fronts import (
    Front,
    MailLog,
    Reply,
    Runner,
    Spool,
    capture,
    first_line,
    queue_id,
    reply_for,
)
from compartment.recipients import Lookup, Recipient

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    message_bytes: int = 50 << 20   # SIZE, and 552 past it
    recipients: int = 100           # per transaction: 452 4.5.3 past it
    idle_timeout_s: float = 300.0   # between commands
    data_timeout_s: float = 600.0   # from DATA to the final dot


class Transaction(Envelope):
    """aiosmtpd's envelope, with the recipients as the lookup found them."""

    def __init__(self) -> None:
        super().__init__()
        self.recipients: list[Recipient] = []
        self.original: list[str] = []  # ORIGINAL_RECIPIENT of each


class Connection(LMTP):
    """One LMTP session: counted by the front, refused past --max-sessions with 421, and
    timed: the idle timeout between commands, the DATA timeout from DATA to the dot, none while
    the deliveries run (each is bounded by its policy's wall_timeout_s)."""

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.front = handler.front
        self.busy = False
        self.refused = False

    def _create_envelope(self) -> Transaction:
        return Transaction()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.refused = self.front.full() or self.front.stopping
        if not self.refused:
            self.front.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.front.sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self.refused:
            self.front.log.warning(f"refused a session from {self.session.peer or 'unix'}: "
                                   f"{self.front.max_sessions} sessions already")
            await self.push("421 4.3.2 too many sessions, try again later")
            self.transport.close()
            return
        await super()._handle_client()

    async def push(self, status: str | bytes) -> None:
        # aiosmtpd echoes arguments in some replies (VRFY, syntax errors); with SMTPUTF8 on, an
        # argument that was not UTF-8 holds surrogates its own encoding refuses, which became an
        # exception and a 4xx for malformed input.  Such bytes are sent as "?".
        if isinstance(status, str):
            status = status.encode("utf-8", "replace")
        await super().push(status)

    async def smtp_DATA(self, arg: str) -> None:
        self._reset_timeout(self.event_handler.limits.data_timeout_s)
        await super().smtp_DATA(arg)

    def hold_timer(self) -> None:
        """No timeout while the deliveries run: their own bound them."""
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def restart_timer(self) -> None:
        self._reset_timeout()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(b"421 4.3.2 compartment lmtp is stopping\r\n")
            self.transport.close()


class Handler:
    """aiosmtpd's hooks: LHLO's extensions, MAIL, RCPT (the lookup), DATA (the deliveries)."""

    def __init__(self, front: Front, runner: Runner, lookup: Lookup, limits: Limits) -> None:
        self.front, self.runner, self.lookup, self.limits = front, runner, lookup, limits

    async def handle_EHLO(self, server: Connection, session: SmtpSession, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        # RFC 2033 4.1: an LMTP server must offer PIPELINING and ENHANCEDSTATUSCODES.
        session.host_name = hostname
        extensions = [line[4:] for line in responses[1:] if line[4:] != "HELP"]
        extensions += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        lines = [responses[0][4:], *extensions]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(self, server: Connection, session: SmtpSession,
                          envelope: Envelope, address: str, options: list[str]) -> str:
        sender = "" if address == "<>" else address
        problem = address_problem(sender)
        if problem:
            return f"553 5.1.7 bad sender address: {problem}"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 sender ok"

    async def handle_RCPT(self, server: Connection, session: SmtpSession,
                          envelope: Transaction, address: str, options: list[str]) -> str:
        problem = address_problem(address)
        if problem:
            return f"553 5.1.3 bad recipient address: {problem}"
        if len(envelope.recipients) >= self.limits.recipients:
            return "452 4.5.3 too many recipients"
        recipient = self.lookup.find(address)
        if recipient is None:
            return f"550 5.1.1 <{address}>: no such user here"
        envelope.rcpt_tos.append(address)
        envelope.recipients.append(recipient)
        envelope.original.append(address)
        return "250 2.1.5 recipient ok"

    async def handle_DATA(self, server: Connection, session: SmtpSession,
                          envelope: Transaction) -> str:
        qid = queue_id()
        spool = Spool()
        try:
            _spool_lf(spool, envelope.original_content or b"")
            envelope.content = envelope.original_content = None  # aiosmtpd's own stays
            spool.seal()
            readers = [spool.reader() for _ in envelope.recipients]  # each its own offset
        finally:
            spool.close()
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        self.front.log.info(f"{qid}: from=<{sender}>, size={spool.size}, "
                            f"nrcpt={len(envelope.recipients)}, client={session.peer}")
        server.busy = True
        server.hold_timer()
        try:
            replies = await asyncio.gather(*(
                self._deliver(qid, sender, recipient, original, reader)
                for recipient, original, reader in zip(envelope.recipients, envelope.original,
                                                       readers, strict=True)))
        finally:
            server.busy = False
            server.restart_timer()
            if self.front.stopping:
                asyncio.get_running_loop().call_soon(server.close)
        return "\r\n".join(replies)

    async def _deliver(self, qid: str, sender: str, recipient: Recipient, original: str,
                       stdin: int) -> str:
        values = {"local": recipient.local, "domain": recipient.domain,
                  "recipient": recipient.address, "sender": sender,
                  "mailbox": recipient.mailbox, "extension": recipient.extension}
        env = {"SENDER": sender, "RECIPIENT": recipient.address, "LOCAL": recipient.local,
               "DOMAIN": recipient.domain, "ORIGINAL_RECIPIENT": original}
        if recipient.user:
            env["USER"] = recipient.user
        if recipient.extension:
            env["EXTENSION"] = recipient.extension
        started = time.monotonic()
        reply, result = await self.front.call(self._run, values, env, stdin)
        status = {Verdict.SUCCESS: "sent", Verdict.TEMPORARY: "deferred",
                  Verdict.PERMANENT: "bounced"}[reply.kind]
        self.front.log.info(
            f"{qid}: to=<{recipient.address}>, mailbox={recipient.mailbox}, "
            f"delay={time.monotonic() - started:.2f}, outcome={result.outcome}, "
            f"status={status} ({reply})")
        return str(reply)

    def _run(self, values: dict[str, str], env: dict[str, str], stdin: int) -> tuple[Reply, Any]:
        """In a worker thread: one run, its reply.  Closes stdin, which is this run's own."""
        stdout, stderr = capture(), capture()
        try:
            result = self.runner.run(values, env, stdin, stdout, stderr)
            said = first_line(stderr) or first_line(stdout)
        finally:
            for fd in (stdin, stdout, stderr):
                os.close(fd)
        delivered = f"<{values['recipient']}> delivered in a compartment"
        return reply_for(result, said, delivered), result

    async def handle_exception(self, error: Exception) -> str:
        self.front.log.warning(f"internal error: {type(error).__name__}: {error}")
        return "451 4.3.0 internal error of compartment lmtp"


def _spool_lf(spool: Spool, content: bytes) -> None:
    """Write content with CRLF line ends made LF, a megabyte (cut at a line end) at a time."""
    start = 0
    while start < len(content):
        end = content.find(b"\n", start + _CHUNK)
        end = len(content) if end < 0 else end + 1
        spool.write(content[start:end].replace(b"\r\n", b"\n"))
        start = end


def address_problem(address: str) -> str:
    """Why an envelope address cannot be handed to an agent, or "".  A leading '-' would
    read as an option to the agent (Postfix refuses it too: allow_min_user = no)."""
    if address.startswith("-"):
        return "it begins with '-'"
    if len(address) > 512:
        return "longer than 512 characters"
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) < 0xE000 for c in address):
        return "a control character or bytes that are not UTF-8"
    return ""


def prepare(options: argparse.Namespace, runner: Runner, log: MailLog
            ) -> Callable[[socket.socket, str], Awaitable[None]]:
    """The daemon, from compartment lmtp's options (raises FrontError): a coroutine function
    serving a listening socket until SIGTERM."""
    lookup = Lookup(options.recipients, options.min_uid, options.recipient_delimiter)
    front = Front(log, options.max_sessions, options.max_runs, reload=lookup.reload,
                  drain_s=options.drain_timeout_s)
    limits = Limits(options.max_message_bytes, options.max_recipients,
                    options.idle_timeout_s, options.data_timeout_s)
    handler = Handler(front, runner, lookup, limits)

    async def serve(sock: socket.socket, ready: str) -> None:
        server = await start(handler, sock, options.hostname or socket.gethostname())
        await front.serve(server, ready)
    return serve


async def start(handler: Handler, sock: socket.socket, hostname: str) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()

    def connection() -> Connection:
        return Connection(handler, data_size_limit=handler.limits.message_bytes,
                          enable_SMTPUTF8=True, hostname=hostname, ident="compartment LMTP",
                          timeout=handler.limits.idle_timeout_s, loop=loop)

    return await loop.create_server(connection, sock=sock)

"""An SMTP server (aiosmtpd) that strips attachments in DJB's prison before delivering.

    python3 -m examples.python.smtp_filter --port 8025 --maildir /var/mail/filtered

Each message is handed, as bytes, to an isolated function (compartment.isolate): the MIME
parsing of the hostile message happens in a prison cloned for that message alone, and the
server takes back only bytes, which it delivers into a Maildir.  A failed call (a timeout, a
violation, the function's exception) is a temporary failure, 451: the client keeps the
message and retries.  The server itself parses only SMTP.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from typing import Any

from aiosmtpd.controller import Controller

from compartment import Failed, Isolated, isolate
from examples.python.attachment_stripper import strip


class PrisonHandler:
    """aiosmtpd handler: the message through the isolated function, then into the Maildir."""

    def __init__(self, function: Isolated, maildir: str) -> None:
        self.function, self.maildir = function, maildir

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        try:
            new = await self.function.acall(envelope.original_content)
        except Failed as failed:
            return f"451 4.3.0 not filtered: {failed.outcome}: {failed.reason}"[:500]
        try:
            deliver(self.maildir, new)
        except OSError as err:
            return f"451 4.3.0 cannot deliver: {err.strerror}"
        return "250 2.0.0 filtered and delivered"


def deliver(maildir: str, data: bytes) -> str:
    """Maildir delivery: written in tmp/, synced, renamed into new/; returns the new path."""
    name = f"{time.time_ns()}.{os.getpid()}_{os.urandom(4).hex()}.{socket.gethostname()}"
    tmp, new = os.path.join(maildir, "tmp", name), os.path.join(maildir, "new", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.rename(tmp, new)
    except BaseException:
        os.unlink(tmp)
        raise
    return new


def serve(function: Isolated, maildir: str, port: int) -> Controller:
    """Start the server in a thread of its own; stop it with .stop()."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    controller = Controller(PrisonHandler(function, maildir), hostname="127.0.0.1", port=port)
    controller.start()
    return controller


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--maildir", required=True)
    args = parser.parse_args()
    with isolate(strip, wall_timeout_s=10, memory_bytes="256M") as function:
        controller = serve(function, args.maildir, args.port)
        try:
            asyncio.run(asyncio.Event().wait())  # until interrupted
        finally:
            controller.stop()


if __name__ == "__main__":
    main()

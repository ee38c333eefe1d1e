"""SetupError: a confinement step failed in the child; the record the supervisor receives."""

from __future__ import annotations

import errno as errno_names
import os
import struct

# step, call, errno, detail: a fixed-size record, so that the supervisor parses nothing that the
# child could shape beyond four bounded fields.
RECORD = struct.Struct("16s32si184s")


class SetupError(Exception):
    def __init__(self, step: str, call: str, err: int, detail: str = "") -> None:
        self.step, self.call, self.errno, self.detail = step, call, err, detail
        super().__init__(self.text())

    def text(self) -> str:
        why = os.strerror(self.errno) if self.errno else "check failed"
        name = errno_names.errorcode.get(self.errno, "")
        code = f" [{name}]" if name else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.step}: {self.call}{detail}: {why}{code}"

    def pack(self) -> bytes:
        return RECORD.pack(self.step.encode()[:16], self.call.encode()[:32], self.errno,
                           self.detail.encode(errors="replace")[:184])

    @classmethod
    def unpack(cls, agent_record: bytes) -> SetupError:
        step, call, err, detail = RECORD.unpack(agent_record)
        return cls(*(b.rstrip(b"\0").decode(errors="replace") for b in (step, call)), err,
                   detail.rstrip(b"\0").decode(errors="replace"))


def fail(step: str, call: str, err: OSError | int, detail: str = "") -> SetupError:
    number = err if isinstance(err, int) else (err.errno or 0)
    return SetupError(step, call, number, detail)

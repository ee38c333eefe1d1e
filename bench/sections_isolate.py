"""Section 7: compartment.isolate, a function in a prison per call, against the same function
called in-process (unconfined) and against exec'ing Python to run it under compartment.run (the
API, in this process) and under the `compartment run` command (a process per message, as an MTA
runs it)."""

from __future__ import annotations

import email.policy
import os
import subprocess
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING

import measure
from measure import Target

if TYPE_CHECKING:
    from bench import Context

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
# What `python3 -c` runs under compartment.run: the same two functions, read from stdin.
TRIVIAL_SCRIPT = "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read().upper())"
STRIP_SCRIPT = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                "from examples.python.attachment_stripper import strip; "
                "sys.stdout.buffer.write(strip(sys.stdin.buffer.read()))")


def trivial(data: bytes) -> bytes:
    """The trivial function: what the prison costs, with nothing to do."""
    return data.upper()


def mime_message(size: int) -> bytes:
    """About `size` bytes of mail: a text part and a binary attachment."""
    message = EmailMessage()
    message["From"], message["To"] = "sender@example.org", "rcpt@example.net"
    message["Subject"] = "benchmark message with an attachment"
    message.set_content("A short note; the report is attached.\n")
    message.add_attachment(bytes(range(256)) * (size * 3 // 4 // 256 - 1),
                           maintype="application", subtype="pdf", filename="report.pdf")
    return message.as_bytes(policy=email.policy.SMTP)


def isolated(ctx: Context) -> list[Target]:
    measure.heading("7 compartment.isolate: a function per call in a prison, 10 KiB message")
    if ctx.core is None:
        print("  SKIP: compartment is not usable here")
        return [Target("isolate: trivial function per call", None, 2.0, False, " ms")]
    import compartment
    from examples.python.attachment_stripper import strip

    mime = mime_message(10 << 10)
    with compartment.isolate(trivial) as trivial_isolated, \
            compartment.isolate(strip) as strip_isolated:
        methods, expected = _methods(ctx, mime, trivial_isolated, strip_isolated)
        samples = measure.interleave(methods, ctx.sizes.isolate_rounds,
                                     ctx.sizes.isolate_warmup,
                                     after=lambda name, out: _check(name, out, expected))
        zygote = _zygote_memory(trivial_isolated.zygote_pid)
    measure.table(samples, "in-process trivial")
    print(f"  zygote memory: {zygote}; a prison starts as a copy-on-write clone of it")
    call = samples["isolate trivial"].median
    targets = [Target("isolate: trivial function per call", call, 2.0, at_least=False,
                      unit=" ms")]
    for baseline, what in (("run python3", "compartment.run(python3 -c)"),
                           ("command python3", "`compartment run -- python3 -c`")):
        for function in ("trivial", "stripper"):
            targets.append(Target(f"isolate: {what} / isolate, {function}", measure.ratio(
                samples, f"{baseline} {function}", f"isolate {function}"), 10.0, True))
    return targets


def _methods(ctx: Context, mime: bytes, trivial_isolated: Callable[[bytes], bytes],
             strip_isolated: Callable[[bytes], bytes],
             ) -> tuple[dict[str, Callable[[], object]], dict[str, bytes]]:
    from examples.python.attachment_stripper import strip

    plain = ctx.expected_message
    policy = ctx.core.Policy.load("filter", overrides={"filesystem.readable": str(ROOT)})
    plain_path, mime_path = ctx.scratch / "plain", ctx.scratch / "mime"
    plain_path.write_bytes(plain)
    mime_path.write_bytes(mime)

    command = [ctx.cli, "run", "-p", "filter", "--set", f"filesystem.readable={ROOT}", "--",
               PYTHON, "-I", "-c"]

    def run_command(script: str, path: Path) -> bytes:
        """The whole command, as an MTA would run it per message."""
        with open(path, "rb") as message:
            return subprocess.run([*command, script], stdin=message, capture_output=True,
                                  env=ctx.child_env, check=True, timeout=60).stdout

    def run_python(script: str, path: Path) -> bytes:
        with open(path, "rb") as message, \
                os.fdopen(os.memfd_create("out", os.MFD_CLOEXEC), "w+b") as out, \
                open("/dev/null", "wb") as err:
            ctx.core.deliver(policy, message.fileno(), out.fileno(), err.fileno(),
                             (PYTHON, "-I", "-c", script))
            out.seek(0)
            return out.read()

    methods = {
        "in-process trivial": lambda: trivial(plain),
        "isolate trivial": lambda: trivial_isolated(plain),
        "run python3 trivial": lambda: run_python(TRIVIAL_SCRIPT, plain_path),
        "in-process stripper": lambda: strip(mime),
        "isolate stripper": lambda: strip_isolated(mime),
        "run python3 stripper": lambda: run_python(STRIP_SCRIPT, mime_path),
        "command python3 trivial": lambda: run_command(TRIVIAL_SCRIPT, plain_path),
        "command python3 stripper": lambda: run_command(STRIP_SCRIPT, mime_path),
    }
    stripped = strip(mime)
    expected = {name: stripped if name.endswith("stripper") else trivial(plain)
                for name in methods}
    return methods, expected


def _check(name: str, out: object, expected: dict[str, bytes]) -> None:
    if out != expected[name]:
        raise RuntimeError(f"{name}: wrong output ({len(out)} bytes)")  # type: ignore[arg-type]


def _zygote_memory(pid: int | None) -> str:
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return ", ".join(f"{key} {fields[key].strip()}" for key in ("VmRSS", "RssAnon", "RssFile"))

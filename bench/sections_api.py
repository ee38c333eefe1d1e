"""Sections 1-3: the cost of one small delivery, through the API, the CLI, and concurrently."""

from __future__ import annotations

import os
import statistics
import textwrap
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import baseline
import measure
from measure import Target

if TYPE_CHECKING:
    from bench import Context

CAT = ["/bin/cat"]
READ_ONLY = os.O_RDONLY | os.O_CLOEXEC


class Descriptors:
    """The message (rewound before each delivery) and two memfd sinks (emptied before each)."""

    def __init__(self, ctx: Context) -> None:
        self.message = os.open(ctx.message_path, READ_ONLY)
        self.out = os.memfd_create("bench-out", os.MFD_CLOEXEC)
        self.err = os.memfd_create("bench-err", os.MFD_CLOEXEC)

    def rewind(self) -> None:
        os.lseek(self.message, 0, os.SEEK_SET)
        for sink in (self.out, self.err):
            os.ftruncate(sink, 0)
            os.lseek(sink, 0, os.SEEK_SET)

    def check(self, method: str, expected: bytes) -> None:
        out = os.pread(self.out, len(expected) + 1, 0)
        err = os.pread(self.err, 4096, 0)
        if out != expected or err:
            raise RuntimeError(f"{method}: {len(out)} bytes out (wanted {len(expected)}), "
                               f"stderr {err[:300]!r}")

    def close(self) -> None:
        for fd in (self.message, self.out, self.err):
            os.close(fd)


def _print_bwrap(ctx: Context) -> None:
    if ctx.have_bwrap:
        argv, _actions = ctx.bwrap_cat()
        seccomp = "fd 3: a deny-list BPF like the policy baseline" if ctx.bpf_path else "none"
        print(textwrap.fill(" ".join(argv[1:]), 96, initial_indent="  bwrap options: ",
                            break_on_hyphens=False,
                            subsequent_indent="    "))
        print(f"  bwrap seccomp: {seccomp}")


def api_path(ctx: Context) -> list[Target]:
    sizes = ctx.sizes
    measure.heading(f"1. API path: one 10 KiB delivery through /bin/cat "
                   f"({sizes.api_rounds} rounds interleaved after {sizes.api_warmup} warm-up)")
    text = ("compartment = compartment.run(['/bin/cat'], Policy.load('filter'), stdin=the "
            "message file, stdout/stderr=memfds). posix_spawn = unconfined /bin/cat, the message "
            f"as fd 0, stdout/stderr through {baseline.PIPE_BYTES >> 10} KiB pipes that this "
            "process relays (stdout spliced) to the same memfds. bwrap = the same spawn of "
            "bwrap with the options below.")
    print(textwrap.fill(text, 96, initial_indent="  ", subsequent_indent="  "))
    _print_bwrap(ctx)
    fds = Descriptors(ctx)
    methods: dict[str, Callable[[], object]] = {}
    if ctx.core is not None:
        core = ctx.core
        methods["compartment"] = lambda: core.deliver(core.filter, fds.message, fds.out, fds.err)
    methods["posix_spawn"] = lambda: baseline.spawn_relay(CAT, fds.message, fds.out, fds.err)
    if ctx.have_bwrap:
        argv, actions = ctx.bwrap_cat()
        methods["bwrap"] = lambda: baseline.spawn_relay(argv, fds.message, fds.out, fds.err,
                                                        actions)
    samples = measure.interleave(methods, sizes.api_rounds, sizes.api_warmup, fds.rewind,
                                lambda name, _value: fds.check(name, ctx.expected_message))
    fds.close()
    measure.table(samples, "posix_spawn")
    per_spawn = measure.ratio(samples, "compartment", "posix_spawn")
    return [Target("API: compartment / bwrap", measure.ratio(samples, "compartment", "bwrap"),
                   0.5, at_least=False),
            Target("API: compartment / posix_spawn", per_spawn, 2.5, at_least=False),
            Target("API stretch: compartment / posix_spawn", per_spawn, 2.0, at_least=False)]


def cli_path(ctx: Context) -> list[Target]:
    sizes = ctx.sizes
    measure.heading(f"2. CLI whole process: `PROGRAM < msg > memfd` "
                   f"({sizes.cli_rounds} rounds interleaved after {sizes.cli_warmup} warm-up)")
    fds = Descriptors(ctx)
    methods: dict[str, Callable[[], int]] = {}
    expected: dict[str, bytes] = {}
    if ctx.core is not None and os.access(ctx.cli, os.X_OK):
        cli = [ctx.cli, "run", "-p", "filter", "--", "/bin/cat"]
        methods["compartment run -p filter"] = lambda: baseline.spawn_direct(
            cli, fds.message, fds.out, fds.err, env=ctx.child_env)
    if ctx.have_bwrap:
        argv, actions = ctx.bwrap_cat()
        methods["bwrap"] = lambda: baseline.spawn_direct(argv, fds.message, fds.out, fds.err,
                                                         actions)
    methods["/bin/cat"] = lambda: baseline.spawn_direct(CAT, fds.message, fds.out, fds.err)
    floor = [ctx.python, "-I", "-S", "-c", "pass"]
    methods["python -I -S -c pass"] = lambda: baseline.spawn_direct(floor, fds.message, fds.out,
                                                                     fds.err, env=ctx.child_env)
    for name in methods:
        expected[name] = b"" if name.startswith("python") else ctx.expected_message

    def check(name: str, status: object) -> None:
        if status != 0:
            raise RuntimeError(f"{name}: wait status {status}, stderr "
                               f"{os.pread(fds.err, 600, 0)!r}")
        fds.check(name, expected[name])

    samples = measure.interleave(methods, sizes.cli_rounds, sizes.cli_warmup, fds.rewind, check)
    fds.close()
    measure.table(samples, "/bin/cat")
    return [Target("CLI: compartment run / bwrap (whole process)",
                   measure.ratio(samples, "compartment run -p filter", "bwrap"), 2.5,
                   at_least=False)]


# ---- 3. concurrent callers -----------------------------------------------------------------

def _core_delivery(ctx: Context) -> Callable[[], None]:
    """Opens its own descriptors (a caller's message offset must not be shared)."""
    core, size = ctx.core, len(ctx.expected_message)
    message = os.open(ctx.message_path, READ_ONLY)
    sink, err = baseline.discard_sinks()

    def once() -> None:
        os.lseek(message, 0, os.SEEK_SET)
        result = core.deliver(core.filter, message, sink, err)
        if result.bytes_out != size:
            raise RuntimeError(f"compartment: {result.bytes_out} bytes out, wanted {size}")
    return once


def _spawn_delivery(ctx: Context) -> Callable[[], None]:
    size = len(ctx.expected_message)
    message = os.open(ctx.message_path, READ_ONLY)
    sink, err = baseline.discard_sinks()

    def once() -> None:
        os.lseek(message, 0, os.SEEK_SET)
        copied = baseline.spawn_relay(CAT, message, sink, err)
        if copied != size:
            raise RuntimeError(f"posix_spawn: {copied} bytes out, wanted {size}")
    return once


def _caller(make: Callable[[Context], Callable[[], None]], ctx: Context, go_r: int,
            deliveries: int) -> None:
    """A forked caller: prepare, wait for the start signal, deliver; never returns."""
    code = 1
    try:
        once = make(ctx)
        os.read(go_r, 1)
        for _ in range(deliveries):
            once()
        code = 0
    except BaseException:  # noqa: BLE001 - a forked child must never return into the bench
        traceback.print_exc()
    finally:
        os._exit(code)


def _rate(make: Callable[[Context], Callable[[], None]], ctx: Context, callers: int) -> float:
    """Deliveries per second of `callers` processes delivering concurrently."""
    per_caller = ctx.sizes.per_caller
    go_r, go_w = os.pipe()
    pids = []
    for _ in range(callers):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            _caller(make, ctx, go_r, per_caller)
        pids.append(pid)
    os.close(go_r)
    time.sleep(0.05)  # let every caller finish preparing before the clock starts
    started = time.perf_counter()
    os.write(go_w, b"g" * callers)
    os.close(go_w)
    for pid in pids:
        if os.waitpid(pid, 0)[1] != 0:
            raise RuntimeError("a concurrent caller failed (traceback above)")
    return callers * per_caller / (time.perf_counter() - started)


def callers(ctx: Context) -> list[Target]:
    sizes = ctx.sizes
    measure.heading(f"3. Throughput, 1 and 2 concurrent caller processes x {sizes.per_caller} "
                   f"deliveries ({sizes.callers_rounds} rounds interleaved after 1 warm-up)")
    makers = {"posix_spawn": _spawn_delivery}
    if ctx.core is not None:
        makers = {"compartment": _core_delivery, **makers}
    configs = [(name, count) for name in makers for count in (1, 2)]
    rates: dict[tuple[str, int], list[float]] = {config: [] for config in configs}
    for round_no in range(sizes.callers_rounds + 1):
        start = round_no % len(configs)
        for name, count in configs[start:] + configs[:start]:
            rate = _rate(makers[name], ctx, count)
            if round_no > 0:
                rates[(name, count)].append(rate)
    print(f"  {'method':<16} {'1 caller /s':>12} {'2 callers /s':>13} {'2 / 1':>7}")
    scaling = {}
    for name in makers:
        one = statistics.median(rates[(name, 1)])
        two = statistics.median(rates[(name, 2)])
        scaling[name] = two / one
        print(f"  {name:<16} {one:>12.1f} {two:>13.1f} {two / one:>6.2f}x")
    return [Target("2 callers / 1 caller (compartment, deliveries/s)", scaling.get("compartment"),
                   1.5, at_least=True,
                   note=f"(posix_spawn alone scales {scaling['posix_spawn']:.2f}x here)")]

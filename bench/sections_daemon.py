"""Section 8: the resident supervisor (`compartment serve`) side by side with bwrap and
posix_spawn: a whole `compartment submit` process, one delivery from a warm caller through
compartment.submit(), the CPU of a delivery on both sides of the socket, two concurrent
callers, and the cost after many deliveries against the cost at the start."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import baseline
import measure
import sections_api
from measure import Target

if TYPE_CHECKING:
    from bench import Context

CAT = ["/bin/cat"]


class Served:
    """A daemon of the bench's own: root only, its socket and log in the scratch directory."""

    def __init__(self, ctx: Context) -> None:
        self.socket = str(ctx.scratch / "serve.socket")
        self.log = ctx.scratch / "serve.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [ctx.cli, "serve", "--socket", self.socket, "--config",
                 str(ctx.scratch / "no-serve.toml"), "--log", "stderr"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=ctx.child_env)
        deadline = time.monotonic() + 30
        while not self._listening():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"compartment serve did not start: {self.log.read_text()}")
            time.sleep(0.02)
        self.daemon = self._daemon_pid()
        self.spawner = self._spawner_pid()

    def _listening(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def _daemon_pid(self) -> int:
        return self.process.pid  # bin/compartment execs python: the same process

    def _spawner_pid(self) -> int:
        with open(f"/proc/{self.daemon}/task/{self.daemon}/children") as children:
            return int(children.read().split()[0])

    def cpu_s(self) -> float:
        """The daemon's own CPU, its reaped compartments' and the spawner's, so far."""
        return _stat_cpu(self.daemon, children=True) + _stat_cpu(self.spawner, children=False)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.daemon}/status") as status:
            return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _stat_cpu(pid: int, children: bool) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: the reaped inits
    return ticks / os.sysconf("SC_CLK_TCK")


def daemon_path(ctx: Context) -> list[Target]:
    sizes = ctx.sizes
    measure.heading(f"8. Resident supervisor: one 10 KiB delivery through /bin/cat "
                    f"({sizes.api_rounds // 2} rounds interleaved after {sizes.api_warmup} "
                    "warm-up)")
    if ctx.core is None or not hasattr(ctx.core.module, "submit"):
        print("  SKIP: compartment.submit is not available")
        return [Target("serve: submit whole process / bwrap", None, 2.5, at_least=False)]
    served = Served(ctx)
    try:
        return _measure(ctx, served)
    finally:
        served.stop()


def _measure(ctx: Context, served: Served) -> list[Target]:
    submit = ctx.core.module.submit  # type: ignore[union-attr]
    fds = sections_api.Descriptors(ctx)
    daemon_cpu: dict[str, list[float]] = {}

    def on_daemon(name: str, call: Callable[[], object]) -> Callable[[], object]:
        daemon_cpu[name] = []

        def timed() -> object:
            before = served.cpu_s()
            value = call()
            daemon_cpu[name].append((served.cpu_s() - before) * 1e3)
            return value
        return timed

    def api() -> int:
        result = submit(CAT, "filter", stdin=fds.message, stdout=fds.out, stderr=fds.err,
                        socket_path=served.socket)
        return result.exit_status

    command = [ctx.cli, "submit", "--socket", served.socket, "--", *CAT]
    methods: dict[str, Callable[[], object]] = {
        "compartment.submit (API)": on_daemon("api", api),
        "compartment submit (process)": on_daemon("cli", lambda: baseline.spawn_direct(
            command, fds.message, fds.out, fds.err, env=ctx.child_env)),
        "posix_spawn": lambda: baseline.spawn_relay(CAT, fds.message, fds.out, fds.err) and 0,
    }
    if ctx.have_bwrap:
        argv, actions = ctx.bwrap_cat()
        methods["bwrap (process)"] = lambda: baseline.spawn_direct(argv, fds.message, fds.out,
                                                                   fds.err, actions)

    def check(name: str, status: object) -> None:
        if status != 0:
            raise RuntimeError(f"{name}: status {status}, stderr {os.pread(fds.err, 600, 0)!r}")
        fds.check(name, ctx.expected_message)

    samples = measure.interleave(methods, ctx.sizes.api_rounds // 2, ctx.sizes.api_warmup,
                                 fds.rewind, check)
    fds.close()
    measure.table(samples, "bwrap (process)" if ctx.have_bwrap else "posix_spawn")
    cpu = {"compartment.submit (API)": _cpu(samples, daemon_cpu, "compartment.submit (API)",
                                            "api"),
           "compartment submit (process)": _cpu(samples, daemon_cpu,
                                                "compartment submit (process)", "cli")}
    for name, ms in cpu.items():
        print(f"  {name}: {ms:.3f} ms CPU per delivery, caller and daemon side together "
              f"(daemon, spawner, compartment: {statistics.fmean(daemon_cpu[_key(name)]):.3f})")
    bwrap_cpu = statistics.fmean(samples["bwrap (process)"].cpu_ms) if ctx.have_bwrap else None
    scaling = _scaling(ctx, served)
    flat = _flat(ctx, served, api, fds_factory=lambda: sections_api.Descriptors(ctx))
    whole = measure.ratio(samples, "compartment submit (process)", "bwrap (process)")
    warm = measure.ratio(samples, "compartment.submit (API)", "bwrap (process)")
    cpu_ratio = cpu["compartment.submit (API)"] / bwrap_cpu if bwrap_cpu else None
    return [Target("serve: submit whole process / bwrap whole process", whole, 2.5,
                   at_least=False),
            Target("serve stretch: submit whole process / bwrap", whole, 2.0, at_least=False),
            Target("serve: API delivery (warm caller) / bwrap whole process", warm, 0.75,
                   at_least=False),
            Target("serve stretch: API delivery / bwrap whole process", warm, 0.5,
                   at_least=False),
            Target("serve: CPU per API delivery (both sides) / bwrap's", cpu_ratio, 2.0,
                   at_least=False),
            Target("serve: 2 concurrent callers / 1 (deliveries/s)", scaling, 1.6,
                   at_least=True),
            Target("serve: API delivery after many deliveries / at the start", flat, 1.1,
                   at_least=False)]


def _key(name: str) -> str:
    return "api" if "API" in name else "cli"


def _cpu(samples: dict[str, measure.Samples], daemon_cpu: dict[str, list[float]], name: str,
         key: str) -> float:
    return statistics.fmean(samples[name].cpu_ms) + statistics.fmean(daemon_cpu[key])


def _scaling(ctx: Context, served: Served) -> float:
    def maker(_ctx: Context) -> Callable[[], None]:
        message = os.open(ctx.message_path, os.O_RDONLY | os.O_CLOEXEC)
        sink, err = baseline.discard_sinks()
        submit = ctx.core.module.submit  # type: ignore[union-attr]

        def once() -> None:
            os.lseek(message, 0, os.SEEK_SET)
            result = submit(CAT, "filter", stdin=message, stdout=sink, stderr=err,
                            socket_path=served.socket)
            if result.exit_status != 0:
                raise RuntimeError(f"compartment.submit: {result.reason}")
        return once

    rates: dict[int, list[float]] = {1: [], 2: []}
    for round_no in range(ctx.sizes.callers_rounds + 1):
        for count in ((1, 2) if round_no % 2 else (2, 1)):
            rate = sections_api._rate(maker, ctx, count)
            if round_no:
                rates[count].append(rate)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(f"  concurrent callers (compartment.submit): 1: {one:.1f}/s, 2: {two:.1f}/s, "
          f"{two / one:.2f}x")
    return two / one


def _flat(ctx: Context, served: Served, api: Callable[[], int],
          fds_factory: Callable[[], sections_api.Descriptors]) -> float:
    """The API delivery's median before and after many deliveries through the same daemon."""
    many = 1000 if ctx.sizes.quick else 10000
    sample_n = 60 if ctx.sizes.quick else 200

    def median_ms() -> float:
        fds = fds_factory()
        times = []
        submit = ctx.core.module.submit  # type: ignore[union-attr]
        for _ in range(sample_n):
            fds.rewind()
            started = time.perf_counter()
            submit(CAT, "filter", stdin=fds.message, stdout=fds.out, stderr=fds.err,
                   socket_path=served.socket)
            times.append((time.perf_counter() - started) * 1e3)
        fds.close()
        return statistics.median(times)

    before, rss_before = median_ms(), served.rss_kib()
    fds = fds_factory()
    submit = ctx.core.module.submit  # type: ignore[union-attr]
    for _ in range(many):
        fds.rewind()
        submit(CAT, "filter", stdin=fds.message, stdout=fds.out, stderr=fds.err,
               socket_path=served.socket)
    fds.close()
    after, rss_after = median_ms(), served.rss_kib()
    print(f"  after {many} more deliveries: {before:.3f} -> {after:.3f} ms per delivery, "
          f"daemon RSS {rss_before} -> {rss_after} KiB")
    return after / before

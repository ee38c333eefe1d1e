"""Sections 4-6: a large message and the supervisor's memory, the timeout, the import time."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import baseline
import measure
from measure import Target

if TYPE_CHECKING:
    from bench import Context

BENCH_DIR = Path(__file__).resolve().parent
CAT = ["/bin/cat"]
MIB = 1 << 20
BIG_BYTES = 64 * MIB
RSS_SIZES_MIB = (1, 64, 512)
RSS_FLAT_MIB = 4.0  # "does not grow with message size": at most this much more at 512 MiB


# ---- 4. one large message --------------------------------------------------------------------

def _write_big(path: Path) -> None:
    """BIG_BYTES of varied bytes, written a MiB at a time (never held whole)."""
    block = bytes(range(256)) * (MIB // 256)
    with open(path, "wb") as big:
        for index in range(BIG_BYTES // MIB):
            big.write(block[index:] + block[:index])


def _throughput(ctx: Context) -> list[Target]:
    """64 MiB deliveries, interleaved with 10 KiB ones (`... small`) so that the fixed cost of
    a delivery can be taken out: the difference is the streaming rate."""
    path = ctx.scratch / "message-64m"
    _write_big(path)
    message = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    small = os.open(ctx.message_path, os.O_RDONLY | os.O_CLOEXEC)
    sink, err = baseline.discard_sinks()
    methods: dict[str, Callable[[], object]] = {}
    if ctx.core is not None:
        core = ctx.core
        big = core.Policy.load("filter", overrides={"limits.output_bytes": "1G"})
        methods["compartment"] = lambda: core.deliver(big, message, sink, err).bytes_out
        methods["compartment small"] = lambda: core.deliver(big, small, sink, err).bytes_out
    methods["posix_spawn"] = lambda: baseline.spawn_relay(CAT, message, sink, err)
    methods["posix_spawn small"] = lambda: baseline.spawn_relay(CAT, small, sink, err)

    def check(name: str, bytes_out: object) -> None:
        wanted = len(ctx.expected_message) if name.endswith("small") else BIG_BYTES
        if bytes_out != wanted:
            raise RuntimeError(f"{name}: {bytes_out} bytes out of {wanted}")

    def rewind() -> None:
        for fd in (message, small):
            os.lseek(fd, 0, os.SEEK_SET)

    samples = measure.interleave(methods, ctx.sizes.big_rounds, 1, rewind, check)
    for fd in (message, small, sink, err):
        os.close(fd)
    path.unlink()
    measure.table(samples, "posix_spawn")
    rates = {}
    for name in ("compartment", "posix_spawn"):
        if name in samples:
            whole = samples[name].median
            streaming = whole - samples[name + " small"].median
            rates[name] = BIG_BYTES / 1e3 / whole
            print(f"  {name:<16} {rates[name]:>6.0f} MB/s per delivery, "
                  f"{BIG_BYTES / 1e3 / streaming:>6.0f} MB/s streaming (minus a 10 KiB delivery)")
    ratio = rates["compartment"] / rates["posix_spawn"] if "compartment" in rates else None
    return [Target("64 MiB: compartment / posix_spawn throughput", ratio, 0.9, at_least=True)]


def _probe(ctx: Context, method: str, size_mib: int) -> dict:
    command = [ctx.python, str(BENCH_DIR / "rss_probe.py"), method, str(size_mib * MIB)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          env=ctx.child_env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr[-800:]}")
    return json.loads(done.stdout)


def _peak_rss(ctx: Context) -> list[Target]:
    print("  peak RSS of a fresh supervisor process carrying one message from `head -c N "
          "/dev/zero`\n  (1 MiB pipe) through /bin/cat to /dev/null: VmHWM in MiB "
          "(ru_maxrss agrees to within a page)")
    methods = (["compartment"] if ctx.core is not None else []) + ["unconfined"]
    peaks: dict[str, dict[int, dict]] = {name: {} for name in methods}
    for size_mib in RSS_SIZES_MIB:
        for name in methods:
            peaks[name][size_mib] = _probe(ctx, name, size_mib)
    idle = _probe(ctx, "idle", 0)
    print(f"  {'method':<14}" + "".join(f" {f'{size} MiB':>9}" for size in RSS_SIZES_MIB)
          + f" {'512 MiB MB/s':>13}")
    for name in methods:
        runs = peaks[name]
        for size_mib, probe in runs.items():
            if probe["bytes_out"] != size_mib * MIB:
                raise RuntimeError(f"{name}: {probe['bytes_out']} bytes out of {size_mib} MiB")
        print(f"  {name:<14}" + "".join(f" {runs[size]['vmhwm_kib'] / 1024:>9.1f}"
                                        for size in RSS_SIZES_MIB)
              + f" {512 * MIB / 1e6 / runs[512]['seconds']:>13.0f}")
    print(f"  {'idle python':<14} {idle['vmhwm_kib'] / 1024:>9.1f}")
    growth = None
    if "compartment" in peaks:
        growth = (peaks["compartment"][512]["vmhwm_kib"]
                  - peaks["compartment"][1]["vmhwm_kib"]) / 1024
    return [Target("supervisor peak RSS growth, 1 MiB -> 512 MiB message", growth, RSS_FLAT_MIB,
                   at_least=False, unit=" MiB")]


def big_message(ctx: Context) -> list[Target]:
    measure.heading(f"4. One 64 MiB message through /bin/cat, file as fd 0, output to /dev/null "
                   f"({ctx.sizes.big_rounds} rounds interleaved after 1 warm-up)")
    return _throughput(ctx) + _peak_rss(ctx)


# ---- 6. import time --------------------------------------------------------------------------

RUN_PATH = "import compartment; compartment.run"


def _importtime(python: str, code: str, env: dict[str, str]) -> dict[str, tuple[int, int]]:
    """module -> (self us, cumulative us) from `python -X importtime -c code`."""
    done = subprocess.run([python, "-X", "importtime", "-c", code], capture_output=True,
                          text=True, timeout=60, check=True, env=env)
    modules = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|")
        modules[name.strip()] = (int(own), int(cumulative))
    return modules


def _run_path_imports(ctx: Context, env: dict[str, str]) -> tuple[float, dict]:
    """Median over runs of the summed self times of the modules the run path adds to a bare
    start-up, and the module table of that median run."""
    startup = _importtime(ctx.python, "pass", env)
    runs = []
    for _ in range(ctx.sizes.import_runs):
        modules = _importtime(ctx.python, RUN_PATH, env)
        run_path = {name: t for name, t in modules.items() if name not in startup}
        runs.append((sum(own for own, _cumulative in run_path.values()), run_path))
    runs.sort(key=lambda run: run[0])
    return runs[len(runs) // 2]


def _wall_ms(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter_ns()
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, env=env)
    return (time.perf_counter_ns() - started) / 1e6


def import_time(ctx: Context) -> list[Target]:
    runs = ctx.sizes.import_runs
    report_heading = f"6. Import time of the run path: `{RUN_PATH}` ({runs} runs)"
    measure.heading(report_heading)
    if ctx.core is None:
        print("  skipped: compartment is not importable")
        return []
    _importtime(ctx.python, RUN_PATH, ctx.child_env)  # fill the bytecode cache
    total_us, table = _run_path_imports(ctx, ctx.child_env)
    print(f"  -X importtime, bytecode cached (an installed package): {total_us / 1e3:.1f} ms, "
          f"the summed self times of the {len(table)} modules the run path adds to start-up")
    print("  top 5 by self time:                         self ms  cumulative ms")
    top = sorted(table.items(), key=lambda item: item[1][0], reverse=True)[:5]
    for name, (own, cumulative) in top:
        print(f"    {name:<40} {own / 1e3:>7.2f} {cumulative / 1e3:>14.2f}")
    commands = {"python -c '" + RUN_PATH + "'": [ctx.python, "-c", RUN_PATH],
                "python -c pass": [ctx.python, "-c", "pass"],
                "python -I -S -c pass": [ctx.python, "-I", "-S", "-c", "pass"]}
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            walls[name].append(_wall_ms(command, ctx.child_env))
    for name, values in walls.items():
        print(f"  whole process {name:<55} median {statistics.median(values):>7.1f} ms")
    return []

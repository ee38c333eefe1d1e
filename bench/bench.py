"""`make bench`: how fast compartment is, as ratios against baselines measured in the same run.

usage: .venv/bin/python bench/bench.py [--quick] [--only 1,2,...]

Methods are interleaved round-robin (the starting method rotates every round), so that drift of
a shared machine hits every method alike; absolute times are noise, the ratios are the figures.
Sections (numbers as in issue 5):
  1 API path per 10 KiB delivery through /bin/cat: compartment.run vs posix_spawn vs bwrap
  2 CLI whole process: compartment run vs bwrap vs /bin/cat
  3 throughput with 1 and 2 concurrent callers (processes)
  4 one 64 MiB message (MB/s), and supervisor peak RSS for 1, 64 and 512 MiB
  5 timeout: from the deadline to the last process of the compartment gone
  6 import time of the run path
  7 compartment.isolate: a function per call in a prison, against in-process and against
    exec'ing python3 under compartment.run (issue 12)
  8 the resident supervisor: compartment submit and compartment.submit vs bwrap (issue 10)
  9 what a cgroup per compartment adds to one delivery (limits.enforcement cgroup vs rlimits)
Benchmarks are not tests: the exit status is 0 whatever the verdicts, 1 only if the bench broke.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import baseline
import measure
import sections_api
import sections_cgroup
import sections_daemon
import sections_fronts
import sections_isolate
import sections_other
import sections_timeout
from measure import Target


class Sizes:
    """How much work each section does; `--quick` is a ~30 s smoke run."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.api_rounds, self.api_warmup = (100, 10) if quick else (600, 30)
        self.cli_rounds, self.cli_warmup = (20, 3) if quick else (120, 10)
        self.callers_rounds, self.per_caller = (2, 40) if quick else (5, 150)
        self.big_rounds = 5 if quick else 30
        self.timeout_runs = 2 if quick else 8
        self.import_runs = 3 if quick else 15
        self.isolate_rounds, self.isolate_warmup = (15, 3) if quick else (100, 5)
        self.cgroup_rounds = 60 if quick else 300


class Context:
    """What every section shares: scratch files, the bwrap filter, the core if importable."""

    def __init__(self, sizes: Sizes, scratch: Path) -> None:
        self.sizes = sizes
        self.scratch = scratch
        self.expected_message = _mail_message(10 << 10)
        self.message_path = scratch / "message-10k"
        self.message_path.write_bytes(self.expected_message)
        bpf = baseline.seccomp_bpf()
        self.bpf_path: str | None = None
        if bpf is not None:
            (scratch / "filter.bpf").write_bytes(bpf)
            self.bpf_path = str(scratch / "filter.bpf")
        self.have_bwrap = baseline.bwrap_path() is not None
        self.python = sys.executable
        # Child interpreters read and write bytecode in a cache of the bench's own, as an
        # installed package has its bytecode; PYTHONDONTWRITEBYTECODE (set in some shells and
        # CI) would otherwise make every CLI run compile compartment from source.
        self.child_env = {name: value for name, value in os.environ.items()
                          if name != "PYTHONDONTWRITEBYTECODE"}
        self.child_env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
        self.cli = str(Path(sys.executable).parent / "compartment")
        self.core, self.core_missing = _load_core(self.message_path)
        self.view = baseline.View()
        if self.core is not None:
            # Fill that cache now, or the first child measured pays for compiling.
            subprocess.run([self.python, "-c", "import compartment.cli"], env=self.child_env,
                           check=False, timeout=60)
            shown = self.core.filter.filesystem
            self.view = baseline.View(shown.etc, shown.devices, shown.tmp_bytes)

    def bwrap_cat(self) -> tuple[list[str], list[tuple]]:
        return (baseline.bwrap_argv(["/bin/cat"], self.bpf_path is not None, self.view),
                baseline.bwrap_actions(self.bpf_path))


class Core:
    """The compartment API, behind one switch: None until `import compartment` works."""

    def __init__(self, module: object) -> None:
        self.module = module
        self.run: Callable = module.run  # type: ignore[attr-defined]
        self.Policy = module.Policy  # type: ignore[attr-defined]
        self.filter = self.Policy.load("filter")

    def deliver(self, policy: object, message_fd: int, out_fd: int, err_fd: int,
                program: tuple[str, ...] = ("/bin/cat",)) -> object:
        result = self.run(list(program), policy, stdin=message_fd, stdout=out_fd, stderr=err_fd)
        if result.outcome != "ok":
            raise RuntimeError(f"compartment run {program}: {result.outcome}: {result.reason}")
        return result


def _load_core(message_path: Path) -> tuple[Core | None, str]:
    """The core, if it imports and delivers one message; else None and why."""
    try:
        import compartment

        core = Core(compartment)
        with (open(message_path, "rb") as message, open("/dev/null", "wb") as sink,
              os.fdopen(os.memfd_create("stderr", os.MFD_CLOEXEC), "wb") as err):
            result = core.run(["/bin/cat"], core.filter, stdin=message, stdout=sink, stderr=err)
        if result.outcome != "ok":
            return None, f"a trial delivery failed: {result.outcome}: {result.reason}"
    except Exception as exc:  # noqa: BLE001 - any failure means: bench the baselines only
        return None, f"{type(exc).__name__}: {exc}"
    return core, ""


def _mail_message(size: int) -> bytes:
    """A plausible mail message of exactly `size` bytes."""
    head = (b"Return-Path: <sender@example.org>\nFrom: Sender <sender@example.org>\n"
            b"To: rcpt@example.net\nSubject: benchmark message\n"
            b"Message-ID: <bench@example.org>\n\n")
    body = b"".join(b"line %05d of a message body that is long enough to look like text\n" % i
                    for i in range(size // 40))
    return (head + body)[:size - 1] + b"\n"


def machine_facts() -> list[str]:
    model = "?"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return [f"date       {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            f"machine    {os.cpu_count()} cpus ({len(os.sched_getaffinity(0))} usable), "
            f"{model}, {pages / (1 << 30):.1f} GiB",
            f"kernel     {platform.system()} {platform.release()} {platform.machine()}",
            f"python     {sys.executable} {platform.python_version()}",
            f"bwrap      {baseline.bwrap_version()}",
            f"euid       {os.geteuid()}"]


SECTIONS: dict[str, Callable[[Context], list[Target]]] = {
    "1": sections_api.api_path,
    "2": sections_api.cli_path,
    "3": sections_api.callers,
    "4": sections_other.big_message,
    "5": sections_timeout.timeout,
    "6": sections_other.import_time,
    "7": sections_isolate.isolated,
    "8": sections_daemon.daemon_path,
    "9": sections_cgroup.cgroup_cost,
    "10": sections_fronts.fronts,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run, e.g. 1,4")
    args = parser.parse_args()
    started = time.monotonic()
    print("compartment bench" + (" (--quick)" if args.quick else ""))
    for line in machine_facts():
        print("  " + line)
    scratch_root = "/dev/shm" if os.path.isdir("/dev/shm") else None  # no disk writeback noise
    with tempfile.TemporaryDirectory(prefix="compartment-bench-", dir=scratch_root) as scratch:
        ctx = Context(Sizes(args.quick), Path(scratch))
        if ctx.core is None:
            print(f"  core       NOT usable ({ctx.core_missing}): compartment rows skipped")
        if not ctx.have_bwrap:
            print("  bwrap      missing (apt-get install -y bubblewrap): bwrap rows skipped")
        targets: list[Target] = []
        for key in args.only.split(","):
            targets += SECTIONS[key.strip()](ctx)
    measure.summary(targets)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\nbench took {time.monotonic() - started:.1f} s "
          f"(bench process peak RSS {usage.ru_maxrss / 1024:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

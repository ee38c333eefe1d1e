"""Checks made outside after a hostile case ran: each returns what it found (empty when the
case was contained).  A finding that starts with CLASS is about the exit class instead.

Test side, root.  `prepare_*`-style hooks (plant_links, kmsg_open, sample_host_memory, leak_fd,
remember_agent_binary) run before the agent and record what the check compares against.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import threading
from pathlib import Path

from hostile_run import CLASS, CaseRun

SMALL_FILE = 4 << 20      # limits.file_bytes for the disk cases
SMALL_OUTPUT = 1 << 20    # limits.output_bytes for the flood cases
MEMFD_LIMIT = 256 << 20   # limits.memory_bytes of the memfd case, which holds up to 768 MiB
DIAGNOSTIC_SLACK = 4096   # the runner's own reason line and the agent's last words
BOMB_MEMORY = 64 << 20    # limits.memory_bytes of the tmpfs and socket-buffer bombs
TMPFS_BYTES = 512 << 20   # filesystem.tmp_bytes of the tmpfs bomb
DEFAULT_PROCESSES = 64    # limits.processes of the shipped filter policy


def host_root_names(run: CaseRun) -> list[str]:
    """Names at the host's / that no policy shows (the compartment's / is built, not bound)."""
    shown = {"usr", "bin", "lib", "lib32", "lib64", "libx32", "sbin", "etc", "tmp", "dev",
             "proc", "home", "run", "var", ".", ".."}
    listed = set(re.findall(rb"^entry //?([^/\n]+)$", run.seen.stdout, re.M))
    hidden = {name.encode() for name in os.listdir("/")} - {n.encode() for n in shown}
    return [f"host's / seen inside: {name.decode()}" for name in sorted(listed & hidden)]


def host_home_entries(run: CaseRun) -> list[str]:
    listed = set(re.findall(rb"^entry /home/([^/\n]+)$", run.seen.stdout, re.M))
    return [f"host's /home seen inside: {n.decode()}" for n in sorted(listed - {b".", b".."})]


def host_paths_walked(run: CaseRun) -> list[str]:
    private = [str(run.outside.root), "/work", "/root/", "/home/", "/old_root", "/farm",
               "/var/", "/opt/", "/srv/", "/boot/"]
    found = []
    for line in run.seen.stdout.decode(errors="replace").splitlines():
        if any(line == p.rstrip("/") or line.startswith(p) for p in private):
            found.append(f"host path seen inside: {line}")
    return found[:5]


def shadow_in_output(run: CaseRun) -> list[str]:
    first = Path("/etc/shadow").read_bytes().split(b"\n", 1)[0]
    return ["/etc/shadow reached the caller"] if first and first in run.seen.stdout else []


def setid_files(run: CaseRun) -> list[str]:
    return [f"set-id file left in the mail directory: {p.name} mode {oct(p.lstat().st_mode)} "
            f"owner {p.lstat().st_uid}" for p in run.mail.rglob("*")
            if p.lstat().st_mode & (stat.S_ISUID | stat.S_ISGID) and p.is_file()]


def file_capabilities(run: CaseRun) -> list[str]:
    found = []
    for path in run.mail.rglob("*"):
        with contextlib.suppress(OSError):
            os.getxattr(path, "security.capability", follow_symlinks=False)
            found.append(f"file with capabilities in the mail directory: {path.name}")
    return found


def reserved_blocks(run: CaseRun) -> list[str]:
    """Disk held beyond limits.file_bytes: blocks on the host, or what the agent reported
    holding in the message's copy (gone with the run, so only the agent can tell)."""
    held = sum(p.lstat().st_blocks * 512 for p in run.mail.rglob("*") if p.is_file())
    match = re.search(rb"RESERVED (\d+) bytes", run.seen.stdout)
    held = max(held, int(match[1]) if match else 0)
    return [f"held {held >> 20} MiB of disk beyond limits.file_bytes {SMALL_FILE >> 20} MiB "
            f"(fallocate FALLOC_FL_KEEP_SIZE)"] if held > SMALL_FILE else []


def total_written(run: CaseRun) -> list[str]:
    total = sum(p.lstat().st_size for p in run.mail.rglob("*") if p.is_file())
    if total > 16 * SMALL_FILE:
        return [f"wrote {total >> 20} MiB into the mail directory: limits.file_bytes bounds one "
                f"file, nothing bounds the total"]
    return []


def _meminfo() -> dict[str, int]:
    found = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Shmem", "MemAvailable"):
            found[name] = int(value.split()[0]) * 1024
    return found


def sample_host_memory(run: CaseRun) -> None:
    """Watch the host's memory while the agent runs: the highest Shmem (tmpfs and memfd pages)
    and the lowest MemAvailable (kernel memory, socket buffers among it)."""
    stop, base = threading.Event(), _meminfo()
    extreme = dict(base)

    def watch() -> None:
        while not stop.wait(0.02):
            now = _meminfo()
            extreme["Shmem"] = max(extreme["Shmem"], now["Shmem"])
            extreme["MemAvailable"] = min(extreme["MemAvailable"], now["MemAvailable"])

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    run.extra["host"] = (stop, thread, base, extreme)


def _host_grown(run: CaseRun) -> tuple[int, int]:
    """(Shmem grown by, MemAvailable dropped by) while the agent ran."""
    stop, thread, base, extreme = run.extra["host"]
    stop.set()
    thread.join()
    return (extreme["Shmem"] - base["Shmem"],
            base["MemAvailable"] - extreme["MemAvailable"])


def _cgroup_acted(run: CaseRun, outcome: str) -> list[str]:
    """As root the compartment's cgroup is the limit, and the outcome must name it."""
    if run.case.user == "root" and run.seen.outcome != outcome:
        return [CLASS + f"outcome {run.seen.outcome}: the cgroup should have ended it as "
                f"{outcome}"]
    return []


def shmem_bounded(run: CaseRun) -> list[str]:
    grown, _ = _host_grown(run)
    if grown > MEMFD_LIMIT + (64 << 20):
        return [f"held {grown >> 20} MiB of host memory with limits.memory_bytes "
                f"{MEMFD_LIMIT >> 20} MiB (memfd pages are not in RLIMIT_AS)"]
    return []


def tmpfs_bounded(run: CaseRun) -> list[str]:
    """Files in the compartment's /tmp are its memory: bounded by limits.memory_bytes under a
    cgroup, by filesystem.tmp_bytes alone without (the unprivileged mode)."""
    grown, _ = _host_grown(run)
    root = run.case.user == "root"
    bound = BOMB_MEMORY if root else TMPFS_BYTES
    if grown > bound + (64 << 20):
        return [f"held {grown >> 20} MiB of tmpfs pages with a bound of {bound >> 20} MiB"]
    return _cgroup_acted(run, "memory-limit")


def socket_memory_bounded(run: CaseRun) -> list[str]:
    _, dropped = _host_grown(run)
    if dropped > BOMB_MEMORY + (256 << 20):  # other tests share this host's memory
        return [f"host memory fell by {dropped >> 20} MiB while the agent filled socket "
                f"buffers, with limits.memory_bytes {BOMB_MEMORY >> 20} MiB"]
    return _cgroup_acted(run, "memory-limit")


def processes_bounded(run: CaseRun) -> list[str]:
    """The bombs print how many processes or threads they made besides themselves."""
    made = [int(n) for n in re.findall(rb"(?:forked|threads) (\d+)", run.seen.stdout)]
    if any(n > DEFAULT_PROCESSES - 1 for n in made):
        return [f"made {max(made)} processes or threads with limits.processes "
                f"{DEFAULT_PROCESSES}"]
    return []


def cpu_total_bounded(run: CaseRun) -> list[str]:
    return _cgroup_acted(run, "cpu-limit")


def finished_if_success(run: CaseRun) -> list[str]:
    if run.seen.exit_status == 0 and b"finished" not in run.seen.stdout:
        return [CLASS + "success reported for an agent that did not finish"]
    return []


def no_extra_descriptors(run: CaseRun) -> list[str]:
    return [f"descriptor beyond 0-2 open in the agent: {line.decode()}"
            for line in re.findall(rb"EXTRA-FD [^\n]*", run.seen.stdout)]


def postfix_reads_a_bounce(run: CaseRun) -> list[str]:
    """Postfix pipe(8) takes an RFC 3463 code at the start of the output over the status."""
    first = run.seen.stdout.split(b"\n", 1)[0]
    if run.seen.exit_status != 0 and re.match(rb"5\.\d+\.\d+", first):
        return [CLASS + f"the output begins with {first[:40]!r}: Postfix bounces despite "
                f"status {run.seen.exit_status}"]
    return []


def hard_links(run: CaseRun) -> list[str]:
    passwd = os.stat("/usr/bin/passwd")
    return [f"hard link to a host file in the mail directory: {p.name}"
            for p in run.mail.rglob("*") if p.is_file() and not p.is_symlink()
            and (p.lstat().st_nlink > 1 or p.lstat().st_ino == passwd.st_ino)]


def device_nodes(run: CaseRun) -> list[str]:
    return [f"device node in the mail directory: {p.name}" for p in run.mail.rglob("*")
            if stat.S_ISCHR(p.lstat().st_mode) or stat.S_ISBLK(p.lstat().st_mode)]


def big_files(run: CaseRun) -> list[str]:
    return [f"file beyond limits.file_bytes in the mail directory: {p.name} {p.lstat().st_size}"
            for p in run.mail.rglob("*") if p.lstat().st_size > SMALL_FILE]


def usr_written(run: CaseRun) -> list[str]:
    path = Path(f"/usr/hostile-{run.outside.token}")
    if path.exists():
        path.unlink()
        return [f"wrote {path} on the host"]
    return []


def parent_written(run: CaseRun) -> list[str]:
    path = run.mail.parent / "escaped"
    return [f"wrote {path} beside the mail directory"] if path.exists() else []


def agent_binary_changed(run: CaseRun) -> list[str]:
    now = hashlib.sha256((run.bin_dir / "files").read_bytes()).hexdigest()
    return ["the agent rewrote its own binary on the host"] if now != run.extra["digest"] else []


def remember_agent_binary(run: CaseRun) -> None:
    run.extra["digest"] = hashlib.sha256((run.bin_dir / "files").read_bytes()).hexdigest()


def plant_links(run: CaseRun) -> None:
    (run.mail / "link").symlink_to(run.outside.evidence / "target")
    (run.mail / "dirlink").symlink_to(run.outside.evidence)


def too_many_fds(run: CaseRun) -> list[str]:
    match = re.search(rb"FDS (\d+)", run.seen.stdout)
    return [f"opened {match[1].decode()} descriptors beyond open_files 256"] \
        if match and int(match[1]) > 256 else []


def stdout_bounded(run: CaseRun) -> list[str]:
    size = len(run.seen.stdout)
    return [f"stdout {size} bytes beyond output_bytes"] if size > SMALL_OUTPUT else []


def stderr_bounded(run: CaseRun) -> list[str]:
    size = len(run.seen.stderr)
    return [f"stderr {size} bytes beyond output_bytes"] \
        if size > SMALL_OUTPUT + DIAGNOSTIC_SLACK else []


def euid0(run: CaseRun) -> list[str]:
    return ["the setuid-root probe ran with euid 0"] if b"EUID0" in run.seen.stdout else []


def host_interfaces(run: CaseRun) -> list[str]:
    names = [n for n in os.listdir("/sys/class/net") if n != "lo"]
    return [f"host interface {n} listed inside" for n in names if n.encode() in run.seen.stdout]


def host_init_seen(run: CaseRun) -> list[str]:
    init = Path("/proc/1/cmdline").read_bytes().split(b"\0")[0]
    return ["host pid 1's command line read inside"] \
        if init and init != b"/sbin/init" and init in run.seen.stdout else []


def tty_input(run: CaseRun) -> list[str]:
    tty = run.extra["tty"]
    os.set_blocking(tty[1], False)
    with contextlib.suppress(BlockingIOError, OSError):
        if b"hostile" in os.read(tty[1], 4096):
            return ["TIOCSTI pushed input into the caller's terminal"]
    return []


def cgroup_made(run: CaseRun) -> list[str]:
    found = []
    for base in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        path = Path(base) / f"hostile-{run.outside.token}"
        if path.is_dir():
            found.append(f"created {path} on the host")
            with contextlib.suppress(OSError):
                path.rmdir()
    return found


def kmsg_open(run: CaseRun) -> None:
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    os.lseek(fd, 0, os.SEEK_END)
    run.extra["kmsg"] = fd


def kmsg_written(run: CaseRun) -> list[str]:
    fd = int(run.extra["kmsg"])
    found = False
    try:
        while True:
            found |= run.outside.token.encode() in os.read(fd, 8192)
    except BlockingIOError:
        pass   # no more records
    except OSError:
        pass   # EPIPE: records overwritten while we read; what we saw still counts
    finally:
        os.close(fd)
    return ["the agent wrote to the host's kernel log"] if found else []


def leak_fd(run: CaseRun) -> None:
    secret = run.outside.root / "fd-secret"
    secret.write_text(run.outside.fd_secret)
    os.chmod(secret, 0o600)
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)   # the caller's mistake this case is about
    run.extra["leaked"] = fd
    run.extra["pass_fds"] = (fd,)   # the CLI caller leaves it open the same way


def close_leak(run: CaseRun) -> list[str]:
    os.close(int(run.extra["leaked"]))
    return []


def supervisor_alive(run: CaseRun) -> list[str]:
    if run.seen.exit_status < 0:
        return [f"the supervisor died by signal {-run.seen.exit_status}"]
    return []

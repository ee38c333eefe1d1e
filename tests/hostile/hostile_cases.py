"""The table of hostile cases: one agent trying one thing, the policy it runs under, the exit
class the caller must see, and what else to look for outside (hostile_checks).

Agents are in agents/ (C programs built by hostile_build, Python scripts run by the system's
/usr/bin/python3 inside the compartment).  Case arguments may name {mail} (the deliver case's
writable directory), {evidence} (outside, never shown), {bin} (the agents, shown read-only) and
{token} (random per case).
"""

from __future__ import annotations

import dataclasses

from hostile_checks import (
    BOMB_MEMORY,
    MEMFD_LIMIT,
    SMALL_FILE,
    SMALL_OUTPUT,
    TMPFS_BYTES,
    agent_binary_changed,
    big_files,
    cgroup_made,
    close_leak,
    cpu_total_bounded,
    device_nodes,
    euid0,
    file_capabilities,
    finished_if_success,
    hard_links,
    host_home_entries,
    host_init_seen,
    host_interfaces,
    host_paths_walked,
    host_root_names,
    kmsg_open,
    kmsg_written,
    leak_fd,
    no_extra_descriptors,
    parent_written,
    plant_links,
    postfix_reads_a_bounce,
    processes_bounded,
    remember_agent_binary,
    reserved_blocks,
    sample_host_memory,
    setid_files,
    shadow_in_output,
    shmem_bounded,
    socket_memory_bounded,
    stderr_bounded,
    stdout_bounded,
    supervisor_alive,
    tmpfs_bounded,
    too_many_fds,
    total_written,
    tty_input,
    usr_written,
)
from hostile_run import Case, Expect, blocked, limit, status, violation

# --- the table ----------------------------------------------------------------------------

def _c(name: str, group: str, agent: str, *args: str, expect: Expect, **options: object) -> Case:
    return Case(name=name, group=group, agent=agent, args=args, expect=expect, **options)


OK = status(0, "ok")
STOPPED_BY_SIGNAL = limit("signal")
FILE_LIMIT = limit("signal", "agent-failed")   # SIGXFSZ, or EFBIG for an agent that checks
OTHER_ABI = limit("violation", "signal")       # the architecture check kills with SIGSYS
SMALL_DISK = {"limits.file_bytes": str(SMALL_FILE)}
WITH_PROC = {"filesystem.proc": "true"}

FILES = [
    _c("read-root-secret", "files", "files", "read", "{evidence}/secret-root", expect=blocked()),
    _c("read-world-file", "files", "files", "read", "{evidence}/world", expect=blocked()),
    _c("read-secret-strict", "files", "files", "read", "{evidence}/secret-root",
       expect=blocked(), policy="strict"),
    _c("read-secret-python", "files", "py:read_path", "{evidence}/world", expect=blocked()),
    _c("read-etc-shadow", "files", "files", "read", "/etc/shadow", expect=blocked(),
       check=shadow_in_output),
    _c("list-root", "files", "files", "list", "/", expect=OK, check=host_root_names),
    _c("list-home", "files", "files", "list", "/home",
       expect=Expect(frozenset({0, 75}), frozenset({"ok", "agent-failed"})),
       check=host_home_entries),
    _c("walk-root-python", "files", "py:walk_root", expect=status(75, "agent-failed"),
       check=host_paths_walked),
    _c("write-evidence-dir", "files", "files", "write", "{evidence}/written", expect=blocked(),
       policy="deliver"),
    _c("write-usr", "files", "files", "write", "/usr/hostile-{token}", expect=blocked(),
       policy="deliver", check=usr_written),
    _c("write-beside-mail", "files", "files", "write", "{root}/escaped", expect=blocked(),
       policy="deliver", check=parent_written),
    _c("setuid-file", "files", "files", "setuid", "{mail}/suid", expect=blocked(),
       policy="deliver", check=setid_files),
    _c("setgid-file", "files", "files", "setgid", "{mail}/sgid", expect=blocked(),
       policy="deliver", check=setid_files),
    _c("setuid-by-open", "files", "files", "setid-by", "open", "{mail}/suid", expect=blocked(),
       policy="deliver", check=setid_files),
    _c("setuid-by-mknod", "files", "files", "setid-by", "mknod", "{mail}/suid",
       expect=blocked(), policy="deliver", check=setid_files),
    _c("setuid-by-fchmodat2", "files", "files", "setid-by", "fchmodat2", "{mail}/suid",
       expect=blocked(), policy="deliver", check=setid_files),
    _c("setuid-by-tmpfile", "files", "files", "setid-by", "tmpfile", "{mail}/suid",
       expect=blocked(), policy="deliver", overrides=WITH_PROC, check=setid_files),
    _c("file-capabilities", "files", "files", "setid-by", "fcaps", "{mail}/fcaps",
       expect=blocked(), policy="deliver", check=file_capabilities),
    _c("rewrite-own-binary", "files", "files", "rewrite-self", expect=blocked(),
       prepare=remember_agent_binary, check=agent_binary_changed),
    _c("symlink-write-out", "files", "files", "write", "{mail}/link", expect=blocked(),
       policy="deliver", prepare=plant_links),
    _c("symlink-read-out", "files", "files", "read", "{mail}/dirlink/world", expect=blocked(),
       policy="deliver", prepare=plant_links),
    _c("hardlink-setuid-binary", "files", "files", "link", "/usr/bin/passwd", "{mail}/passwd",
       expect=blocked(), policy="deliver", check=hard_links),
    _c("mknod-dev-mem", "files", "files", "mknod", "{mail}/mem", expect=blocked(),
       policy="deliver", check=device_nodes),
]

NETWORK = [
    _c("tcp-loopback", "network", "net", "tcp4", expect=violation("socket")),
    _c("udp-loopback", "network", "net", "udp4", expect=violation("socket")),
    _c("tcp6-loopback", "network", "net", "tcp6", expect=violation("socket")),
    _c("tcp-python", "network", "py:tcp_connect", expect=violation("socket")),
    _c("tcp-strict", "network", "net", "tcp4", expect=violation("socket"), policy="strict"),
    _c("unix-socket-path", "network", "net", "unix", expect=blocked()),
    _c("unix-socket-strict", "network", "net", "unix", expect=violation("socket"),
       policy="strict"),
    _c("abstract-socket", "network", "net", "abstract", expect=blocked()),
    _c("raw-socket", "network", "net", "raw", expect=violation("socket")),
    _c("packet-socket", "network", "net", "packet", expect=violation("socket")),
    _c("vsock", "network", "net", "vsock", expect=violation("socket")),
    _c("netlink-route", "network", "net", "netlink", expect=violation("socket"),
       check=host_interfaces),
]

PROCESSES = [
    _c("fork-bomb", "processes", "procs", "fork-bomb", expect=limit("timeout"), wall_s=3,
       check=processes_bounded),
    _c("fork-bomb-python", "processes", "py:fork_bomb", expect=limit("timeout"), wall_s=3),
    _c("fork-bomb-strict", "processes", "procs", "fork-bomb",
       expect=limit("violation", "timeout"), policy="strict", wall_s=3),
    _c("thread-bomb", "processes", "procs", "thread-bomb", expect=limit("timeout"), wall_s=3,
       check=processes_bounded),
    _c("kill-canary-same-uid", "processes", "procs", "kill-same", expect=blocked(),
       uid="canary"),
    _c("kill-canary-root", "processes", "procs", "kill-root", expect=blocked()),
    _c("ptrace-canary-same-uid", "processes", "procs", "ptrace-same",
       expect=violation("ptrace"), uid="canary"),
    _c("ptrace-canary-root", "processes", "procs", "ptrace-root", expect=violation("ptrace")),
    _c("kill-minus-one", "processes", "procs", "kill-all", expect=blocked(), uid="canary"),
    _c("kill-pid-scan", "processes", "procs", "kill-scan", expect=blocked(), uid="canary"),
    _c("signal-supervisor", "processes", "procs", "signal-supervisor", expect=blocked(),
       via="cli", check=supervisor_alive),
    # The init has the agent's uid.  Whatever the agent does to it, success must mean the
    # agent finished, and a failure it caused must not be reported as the runner's internal
    # error.  (Run from pytest, whose faulthandler handlers the init inherits: without every
    # signal blocked in the init, this case killed it.)
    _c("signal-init", "processes", "procs", "signal-init",
       expect=Expect(frozenset({0, 75}), frozenset({"ok", "signal", "agent-failed",
                                                    "violation"})),
       check=finished_if_success),
    _c("fd-inventory", "processes", "procs", "fd-inventory", expect=blocked(),
       check=no_extra_descriptors),
    _c("fd-inventory-cli", "processes", "procs", "fd-inventory", expect=blocked(), via="cli",
       check=no_extra_descriptors),
    # The run is over when the compartment is empty: a daemon the agent left keeps it busy
    # until the deadline, which kills it whole and is a timeout, never the agent's success.
    _c("double-fork-daemon", "processes", "procs", "double-fork", expect=limit("timeout"),
       wall_s=2),
    _c("setsid-setpgid", "processes", "procs", "setsid", expect=limit("timeout"), wall_s=2),
]

RESOURCES = [
    _c("memory-bomb", "resources", "resources", "memory",
       expect=limit("memory-limit", "signal"), overrides={"limits.memory_bytes": "256M"}),
    _c("memory-bomb-python", "resources", "py:memory_bomb",
       expect=limit("memory-limit", "agent-failed"), overrides={"limits.memory_bytes": "256M"}),
    _c("stack-overflow", "resources", "resources", "stack",
       expect=limit("memory-limit", "signal")),
    _c("cpu-spin", "resources", "resources", "spin", expect=limit("cpu-limit"),
       overrides={"limits.cpu_seconds": "1"}, wall_s=6),
    # 3.2 s of CPU in fresh processes, each under RLIMIT_CPU: only the cgroup counts them all
    _c("cpu-serial-children", "resources", "resources", "spin-serial", "8", "400",
       expect=limit("cpu-limit"), overrides={"limits.cpu_seconds": "1"}, wall_s=8,
       check=cpu_total_bounded),
    _c("sleep-forever", "resources", "resources", "sleep", expect=limit("timeout"), wall_s=2),
    _c("sleep-forever-strict", "resources", "resources", "sleep",
       expect=limit("timeout", "violation"), policy="strict", wall_s=2),
    _c("fill-tmp", "resources", "resources", "fill", "/tmp/fill", expect=blocked()),
    _c("fill-mail-dir", "resources", "resources", "fill", "{mail}/fill", expect=FILE_LIMIT,
       policy="deliver", overrides=SMALL_DISK, check=big_files),
    _c("sparse-1tib", "resources", "resources", "sparse", "{mail}/sparse", expect=FILE_LIMIT,
       policy="deliver", overrides=SMALL_DISK, check=big_files),
    _c("sparse-1tib-tmp", "resources", "resources", "sparse", "/tmp/sparse",
       expect=FILE_LIMIT),
    _c("reserve-mail-dir", "resources", "resources", "reserve", "{mail}/reserved",
       expect=blocked(), policy="deliver", overrides=SMALL_DISK, check=reserved_blocks),
    _c("reserve-stdin-copy", "resources", "resources", "reserve", "-", expect=blocked(),
       overrides={**SMALL_DISK, "message.stdin": "file"}, check=reserved_blocks),
    _c("fill-mail-many-files", "resources", "resources", "fill-many", "{mail}", "256", "3",
       expect=blocked(), policy="deliver", overrides=SMALL_DISK, check=total_written),
    _c("memfd-bomb", "resources", "resources", "memfd", "768", "32",
       expect=limit("timeout", "memory-limit"), wall_s=4,
       overrides={"limits.memory_bytes": str(MEMFD_LIMIT)}, prepare=sample_host_memory,
       check=shmem_bounded),
    # /tmp files are memory: the cgroup counts them against limits.memory_bytes
    _c("tmpfs-bomb", "resources", "resources", "fill-many", "/tmp", "512", "32",
       expect=limit("memory-limit", "agent-failed"), prepare=sample_host_memory,
       overrides={"limits.memory_bytes": str(BOMB_MEMORY),
                  "filesystem.tmp_bytes": str(TMPFS_BYTES)}, check=tmpfs_bounded),
    # kernel memory no rlimit sees: 1 GiB of socket buffers wanted, in 128 processes
    _c("socket-buffer-bomb", "resources", "resources", "sockets", "1024", "128",
       expect=limit("memory-limit", "timeout"), wall_s=4, prepare=sample_host_memory,
       overrides={"limits.memory_bytes": str(BOMB_MEMORY), "limits.processes": "128"},
       check=socket_memory_bounded),
    _c("fd-exhaustion", "resources", "resources", "fds", expect=blocked(), check=too_many_fds),
    _c("stdout-flood", "resources", "resources", "stdout", expect=limit("output-limit"),
       overrides={"limits.output_bytes": str(SMALL_OUTPUT)}, check=stdout_bounded),
    _c("stderr-flood", "resources", "resources", "stderr", expect=limit("output-limit"),
       overrides={"limits.output_bytes": str(SMALL_OUTPUT)}, check=stderr_bounded),
]

KERNEL = [
    _c("setuid-0", "kernel", "kernel", "setuid0", expect=blocked()),
    _c("setuid-0-strict", "kernel", "kernel", "setuid0", expect=blocked(), policy="strict"),
    _c("setgroups-0", "kernel", "kernel", "setgroups0", expect=blocked()),
    _c("regain-capabilities", "kernel", "kernel", "capset", expect=blocked()),
    _c("exec-setuid-root", "kernel", "kernel", "exec", "{bin}/suid/suid_probe",
       expect=blocked(), check=euid0),
    _c("unshare-user", "kernel", "kernel", "unshare", expect=violation("unshare")),
    _c("unshare-mount", "kernel", "kernel", "unshare-mount", expect=violation("unshare")),
    _c("unshare-python", "kernel", "py:ctypes_unshare", expect=violation("unshare")),
    _c("clone-newuser", "kernel", "kernel", "clone-newuser", expect=violation("clone")),
    _c("clone3-newuser", "kernel", "kernel", "clone3-newuser", expect=blocked()),
    _c("setns", "kernel", "kernel", "setns", expect=violation("setns")),
    _c("mount-tmpfs", "kernel", "kernel", "mount", expect=violation("mount")),
    _c("mount-strict", "kernel", "kernel", "mount", expect=violation("mount"), policy="strict"),
    _c("umount-usr", "kernel", "kernel", "umount", expect=violation("umount2")),
    _c("chroot-escape", "kernel", "kernel", "chroot", expect=violation("chroot")),
    _c("pivot-root", "kernel", "kernel", "pivot-root", expect=violation("pivot_root")),
    _c("open-by-handle-at", "kernel", "kernel", "open-by-handle",
       expect=violation("open_by_handle_at")),
    _c("keyctl", "kernel", "kernel", "keyctl", expect=violation("add_key")),
    _c("bpf", "kernel", "kernel", "bpf", expect=violation("bpf")),
    _c("perf-event-open", "kernel", "kernel", "perf", expect=violation("perf_event_open")),
    _c("userfaultfd", "kernel", "kernel", "userfaultfd", expect=violation("userfaultfd")),
    _c("io-uring", "kernel", "kernel", "io-uring", expect=violation("io_uring_setup")),
    _c("iopl", "kernel", "kernel", "iopl", expect=violation("iopl")),
    _c("finit-module", "kernel", "kernel", "init-module", expect=violation("finit_module")),
    _c("tiocsti", "kernel", "kernel", "tiocsti", expect=violation("ioctl"), stdin="tty",
       check=tty_input),
    _c("proc-1-environ", "kernel", "kernel", "proc1", expect=blocked(), overrides=WITH_PROC,
       check=host_init_seen),
    _c("init-environ-cli", "kernel", "kernel", "proc1", expect=blocked(), overrides=WITH_PROC,
       via="cli"),
    _c("init-memory", "kernel", "kernel", "init-mem", "ENVSECRET-", expect=blocked(),
       overrides=WITH_PROC),
    _c("init-memory-cli", "kernel", "kernel", "init-mem", "ENVSECRET-", expect=blocked(),
       overrides=WITH_PROC, via="cli"),
    _c("proc-1-without-proc", "kernel", "kernel", "proc1", expect=blocked(),
       check=host_init_seen),
    _c("supervisor-proc-mem", "kernel", "kernel", "supervisor-mem", expect=blocked(),
       overrides=WITH_PROC, via="cli", check=supervisor_alive),
    _c("sysfs-cgroup-mkdir", "kernel", "kernel", "sysfs", "hostile-{token}", expect=blocked(),
       check=cgroup_made),
    _c("dev-kmsg", "kernel", "kernel", "kmsg", "hostile-{token}", expect=blocked(),
       prepare=kmsg_open, check=kmsg_written),
    _c("i386-unshare", "kernel", "kernel", "i386", "unshare", expect=OTHER_ABI),
    _c("i386-mount", "kernel", "kernel", "i386", "mount", expect=OTHER_ABI),
    _c("i386-keyctl", "kernel", "kernel", "i386", "keyctl", expect=OTHER_ABI),
    _c("i386-setuid", "kernel", "kernel", "i386", "setuid", expect=OTHER_ABI),
    _c("i386-socket", "kernel", "kernel", "i386", "socket", expect=OTHER_ABI),
    _c("x32-unshare", "kernel", "kernel", "x32",
       expect=limit("violation", "signal", "agent-failed")),
]

LEAKS = [
    _c("secret-descriptor", "leaks", "py:fd_scan", expect=status(75, "agent-failed"),
       prepare=leak_fd, check=close_leak),
    _c("secret-environment", "leaks", "py:env_dump", expect=status(75, "agent-failed")),
]

_FULL_READ = "exit.require_full_read"
EXITS = [
    _c("exit-0", "exits", "procs", "read-then-exit", "0", expect=OK),
    _c("exit-75", "exits", "procs", "read-then-exit", "75", expect=status(75, "agent-failed")),
    _c("exit-100", "exits", "procs", "read-then-exit", "100",
       expect=status(75, "agent-failed")),
    _c("exit-111", "exits", "procs", "read-then-exit", "111",
       expect=status(75, "agent-failed")),
    _c("exit-67-permanent", "exits", "procs", "read-then-exit", "67",
       expect=status(67, "agent-failed")),
    _c("exit-100-qmail-agent", "exits", "procs", "read-then-exit", "100",
       expect=status(77, "agent-failed"), overrides={"exit.agent_codes": "qmail"}),
    _c("exit-111-qmail-agent", "exits", "procs", "read-then-exit", "111",
       expect=status(75, "agent-failed"), overrides={"exit.agent_codes": "qmail"}),
    _c("exit-segv", "exits", "procs", "segv", expect=STOPPED_BY_SIGNAL),
    _c("exit-sigkill-self", "exits", "procs", "kill-self", expect=STOPPED_BY_SIGNAL),
    _c("exit-sigterm-self", "exits", "procs", "raise-term", expect=STOPPED_BY_SIGNAL),
    _c("exit-abort", "exits", "procs", "abort", expect=STOPPED_BY_SIGNAL),
    _c("bounce-line-then-timeout", "exits", "procs", "bounce-line", expect=limit("timeout"),
       wall_s=2, merged=True, check=postfix_reads_a_bounce),
    _c("qmail-caller-segv", "exits", "procs", "segv", expect=status(111, "signal"),
       caller="qmail"),
    _c("qmail-caller-timeout", "exits", "resources", "sleep", expect=status(111, "timeout"),
       caller="qmail", wall_s=2),
    _c("qmail-caller-violation", "exits", "kernel", "bpf", expect=status(111, "violation"),
       caller="qmail"),
    # A qmail caller's agent speaks qmail unless named otherwise: its verdicts pass unchanged.
    _c("qmail-caller-exit-99", "exits", "procs", "read-then-exit", "99",
       expect=status(99, "ok"), caller="qmail"),
    _c("qmail-caller-exit-100", "exits", "procs", "read-then-exit", "100",
       expect=status(100, "agent-failed"), caller="qmail"),
    _c("qmail-caller-exit-67", "exits", "procs", "read-then-exit", "67",
       expect=status(100, "agent-failed"), caller="qmail",
       overrides={"exit.agent_codes": "sysexits"}),
    _c("qmail-caller-exit-75", "exits", "procs", "read-then-exit", "75",
       expect=status(111, "agent-failed"), caller="qmail",
       overrides={"exit.agent_codes": "sysexits"}),
    _c("qmail-99-unread-deliver", "exits", "procs", "exit", "99",
       expect=status(111, "agent-failed"), policy="deliver", caller="qmail"),
    _c("close-stdin-early", "exits", "procs", "close-stdin", expect=OK),
    _c("close-stdin-deliver", "exits", "procs", "close-stdin",
       expect=Expect(frozenset({75}), frozenset({"agent-failed", "ok"})), policy="deliver"),
    _c("exit-0-unread-deliver", "exits", "procs", "exit", "0",
       expect=Expect(frozenset({75}), frozenset({"agent-failed", "ok"})), policy="deliver",
       overrides={_FULL_READ: "true"}),
]

AS_ROOT: list[Case] = FILES + NETWORK + PROCESSES + RESOURCES + KERNEL + LEAKS + EXITS
# The same agents with an unprivileged caller (an MTA's mail user): the compartment is built
# in a user namespace and the agent keeps the caller's uid, so "same uid" means the caller's.
UNPRIVILEGED = [dataclasses.replace(c, name=f"{c.name}@nobody", user="nobody", uid="pool")
                for c in AS_ROOT]
CASES: list[Case] = AS_ROOT + UNPRIVILEGED

"""One test per confinement step: a probe tries the forbidden thing under real confinement.

Each test is written so that it fails if its step is removed, even where another layer would
still stop the attempt (the network test looks at interfaces, not at a blocked socket call).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from agentrun import PROBE, PYTHON, probe, run_agent

from compartment import Outcome, Policy, run, syscalls
from compartment.confine import namespaces, scope

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement tests run as root "
                                "(CI does); the unprivileged mode is tested via `nobody`")


def test_pid_namespace_agent_sees_only_its_compartment():
    code = "import os; print(os.getpid(), sorted(int(p) for p in os.listdir('/proc') " \
           "if p.isdigit()))"
    ran = run_agent([PYTHON, "-I", "-c", code], overrides={"filesystem.proc": "true"})
    assert ran.result.outcome is Outcome.OK, ran.stderr
    # pid 1 is the compartment's init, the agent is pid 2, and nothing of the host is there
    assert ran.stdout.decode().split(" ", 1) == ["2", "[1, 2]\n"]


def test_network_namespace_has_only_loopback():
    code = "print(open('/proc/self/net/dev').read(), end='')"
    ran = run_agent([PYTHON, "-I", "-c", code], overrides={"filesystem.proc": "true"})
    interfaces = [line.split(":")[0].strip() for line in ran.stdout.decode().splitlines()[2:]]
    assert interfaces == ["lo"]


# Only root supervisors on Linux 6.12 or later share a network namespace between compartments.
SHARED_NETWORK = pytest.mark.skipif(
    syscalls.landlock_abi() < scope.MIN_ABI, reason="this kernel has no Landlock scopes (ABI < "
    "6), so each compartment has a network namespace of its own")
SCOPE_HOLDER = """import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind("\\0" + sys.argv[1]); s.listen(); s.settimeout(4)
try:
    s.accept(); print("accepted")
except TimeoutError:
    print("nobody came")
"""
SCOPE_SEEKER = """import errno, socket, sys, time
for _ in range(60):
    try:
        socket.socket(socket.AF_UNIX).connect("\\0" + sys.argv[1]); print("connected"); break
    except ConnectionRefusedError:
        time.sleep(0.05)  # not bound yet
    except OSError as err:
        print(errno.errorcode[err.errno]); break
"""


@SHARED_NETWORK
def test_scope_keeps_abstract_sockets_to_their_compartment():
    """Compartments of one root supervisor, here the two processes of a caller that forked,
    share one empty network namespace; each one's abstract sockets stay its own."""
    namespaces.shared_network()  # made before the fork: both sides join the same one
    name = f"compartment-scope-{os.getpid()}"
    reader, writer = os.pipe()
    holder = os.fork()
    if holder == 0:
        try:
            os.close(reader)
            os.write(writer, run_agent([PYTHON, "-I", "-c", SCOPE_HOLDER, name]).stdout)
        finally:
            os._exit(0)
    os.close(writer)
    seeker = run_agent([PYTHON, "-I", "-c", SCOPE_SEEKER, name])
    os.waitpid(holder, 0)
    with os.fdopen(reader, "rb") as held:
        # EPERM, not ECONNREFUSED: the name was there (one namespace) and Landlock refused it
        assert (seeker.stdout, held.read()) == (b"EPERM\n", b"nobody came\n")


@SHARED_NETWORK
def test_shared_network_survives_a_caller_closing_its_descriptor():
    """A daemon may close every descriptor after its first delivery, and the number of ours
    may then be another file's: the next run must not fail in setns."""
    os.close(namespaces.shared_network())
    other = os.open("/dev/null", os.O_RDONLY)  # the lowest free number: most likely ours
    try:
        ran = run_agent(["/bin/true"])
        assert ran.result.outcome is Outcome.OK, ran.result.reason
    finally:
        os.close(other)


def test_uts_namespace_has_its_own_hostname():
    first, second = probe("facts").json()["hostname"], probe("facts").json()["hostname"]
    assert first.startswith("compartment-") and second.startswith("compartment-")
    # unique per compartment: Maildir file names are time.pid.host, and every agent is pid 2
    assert first != second and socket.gethostname() not in (first, second)


def test_ipc_namespace_hides_host_shared_memory():
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x636F6D70  # "comp"
    segment = libc.shmget(key, 4096, 0o1666)  # IPC_CREAT | 0666
    assert segment >= 0
    try:
        ran = probe("shmstat", str(segment))  # not shmget: seccomp refuses that anyway
        assert ran.json() == {"ok": False, "errno": 22}  # EINVAL: no such id in this namespace
    finally:
        libc.shmctl(segment, 0, None)  # IPC_RMID


def test_mount_namespace_leaves_host_mounts_untouched():
    before = Path("/proc/self/mountinfo").read_text()
    assert probe("facts").result.outcome is Outcome.OK
    assert Path("/proc/self/mountinfo").read_text() == before


def test_filesystem_root_hides_host_files(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    assert probe("read", "/etc/shadow").json() == {"ok": False, "errno": 2}
    assert probe("read", str(secret)).json() == {"ok": False, "errno": 2}
    assert probe("facts").json()["root"] == ["bin", "dev", "etc", "lib", "lib64", "sbin", "tmp",
                                            "usr"]


def test_filesystem_system_view_is_read_only():
    assert probe("write", "/usr/escaped").json() == {"ok": False, "errno": 30}  # EROFS
    assert probe("write", "/escaped").json() == {"ok": False, "errno": 30}
    assert not os.path.exists("/usr/escaped")


def test_filesystem_private_tmp_is_not_the_hosts():
    marker = f"/tmp/compartment-marker-{os.getpid()}"
    assert probe("write", marker).json()["ok"] is True
    assert not os.path.exists(marker)


def test_filesystem_writable_directory_is_shown_read_write(tmp_path):
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    os.chown(maildir, 65534, 65534)
    ran = probe("write", f"{maildir}/new-message", policy="deliver",
                overrides={"filesystem.writable": str(maildir),
                           "exit.require_full_read": "false"})
    assert ran.json()["ok"] is True, ran.stderr
    assert (maildir / "new-message").read_text() == "escaped\n"
    assert (maildir / "new-message").stat().st_uid == 65534  # the owner, not root


def test_credentials_pool_uid_no_groups():
    facts = probe("facts").json()
    uid = facts["uid"][0]
    assert 60000 <= uid <= 60999
    assert facts["uid"] == [uid] * 3 and facts["gid"] == [uid] * 3
    assert facts["groups"] == []


def test_capabilities_all_sets_empty_and_securebits_locked():
    facts = probe("facts").json()
    assert facts["caps"] == {"effective": 0, "permitted": 0, "inheritable": 0, "bounding": 0,
                             "ambient": 0}
    # NOROOT and its lock, NO_SETUID_FIXUP locked off, KEEP_CAPS locked off,
    # NO_CAP_AMBIENT_RAISE and its lock
    assert facts["securebits"] == 0b11101011


@pytest.mark.parametrize(("enforcement", "memory", "processes"), [
    ("rlimits", 300 << 20, 10),  # the init counts
    # under a cgroup, a second line the cgroup pre-empts: twice the limit, twice pids.max
    ("cgroup", 600 << 20, 20),
])
def test_rlimits_are_the_policys(enforcement, memory, processes):
    overrides = {"limits.cpu_seconds": "7", "limits.memory_bytes": "300M",
                 "limits.file_bytes": "1M", "limits.open_files": "33", "limits.processes": "9",
                 "limits.enforcement": enforcement}
    limits = probe("facts", overrides=overrides).json()["rlimits"]
    assert limits == {"RLIMIT_CPU": [7, 8], "RLIMIT_AS": [memory] * 2,
                      "RLIMIT_FSIZE": [1 << 20] * 2, "RLIMIT_NOFILE": [33, 33],
                      "RLIMIT_NPROC": [processes] * 2, "RLIMIT_CORE": [0, 0]}


def test_rlimit_cpu_kills_a_spinning_agent():
    ran = run_agent([PYTHON, "-I", "-c", "while True: pass"],
                    overrides={"limits.cpu_seconds": "1", "limits.enforcement": "rlimits"})
    assert ran.result.outcome is Outcome.CPU_LIMIT
    assert ran.result.exit_status == 75


def test_no_new_privs_and_seccomp_are_set():
    facts = probe("facts").json()
    assert facts["no_new_privs"] == 1
    assert facts["seccomp"] == 2  # SECCOMP_MODE_FILTER


@pytest.mark.parametrize("call, name", [("socket-inet", "socket"), ("ptrace", "ptrace"),
                                        ("unshare", "unshare"), ("mount", "mount"),
                                        ("keyctl", "keyctl"), ("bpf", "bpf")])
def test_seccomp_violation_kills_and_names_the_syscall(call, name):
    ran = probe("syscall", call)
    assert ran.result.outcome is Outcome.VIOLATION
    assert ran.result.denied_syscall == name
    assert ran.result.exit_status == 75
    assert ran.stderr.startswith(f"4.7.0 compartment: seccomp violation: {name}".encode())


def test_seccomp_allows_unix_sockets_when_the_policy_does():
    assert probe("syscall", "socket-unix").json()["ok"] is True
    ran = probe("syscall", "socket-unix", overrides={"network.unix_sockets": "false"})
    assert ran.result.denied_syscall == "socket"


def test_descriptors_only_0_1_2_reach_the_agent():
    leaked = os.open("/etc/hostname", os.O_RDONLY)
    os.set_inheritable(leaked, True)  # the caller forgot O_CLOEXEC
    try:
        assert probe("facts").json()["fds"] == [0, 1, 2]
    finally:
        os.close(leaked)


def test_descriptors_declared_extra_is_handed_over():
    opened = os.open("/etc/hostname", os.O_RDONLY)
    extra = fcntl.fcntl(opened, fcntl.F_DUPFD, 100)  # a number nothing else uses
    os.close(opened)
    try:
        facts = probe("facts", overrides={"descriptors.pass": f"[{extra}]"}).json()
        assert facts["fds"] == [0, 1, 2, extra]
    finally:
        os.close(extra)


def test_session_new_and_signals_reset():
    """MTAs start pipe commands with signals ignored or blocked; the agent gets defaults and a
    session of its own (so no controlling terminal to inject keystrokes into)."""
    script = "grep -E '^Sig(Ign|Blk)' /proc/self/status; cut -d' ' -f6 /proc/self/stat; echo $$"
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as Exim starts pipe commands
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    _raw_sigaction(32, 1)  # SIG_IGN on one of the C library's own, out of the signal module's view
    try:
        ran = run_agent(["/bin/sh", "-c", script], overrides={"filesystem.proc": "true"})
    finally:
        _raw_sigaction(32, 0)
        signal.signal(signal.SIGHUP, old)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    words = ran.stdout.decode().split()
    assert words[words.index("SigIgn:") + 1] == "0" * 16
    assert words[words.index("SigBlk:") + 1] == "0" * 16
    assert words[-2] == words[-1]  # the shell leads its own session


def _raw_sigaction(signum: int, handler: int) -> None:
    action = ctypes.create_string_buffer(handler.to_bytes(8, "little"), 64)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(13, signum, action, None, 8) == 0  # rt_sigaction, x86_64


def test_environment_is_clean_and_envelope_passes():
    env = {"SENDER": "a@example.org", "RECIPIENT": "b@example.net", "SECRET_TOKEN": "hunter2",
           "LD_PRELOAD": "/tmp/evil.so"}
    got = probe("facts", env=env).json()["env"]
    assert got["SENDER"] == "a@example.org" and got["RECIPIENT"] == "b@example.net"
    assert "SECRET_TOKEN" not in got and "LD_PRELOAD" not in got
    assert set(got) <= {"SENDER", "RECIPIENT", "PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}


def test_agent_dies_with_the_supervisor(tmp_path):
    """SIGKILL the supervisor mid-delivery: nothing of the compartment survives."""
    cli = [sys.executable, "-m", "compartment", "run", "--", "/bin/sh", "-c",
           "sleep 100 & sleep 100; wait"]
    supervisor = subprocess.Popen(cli, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    agent_pids = _wait_for_children_of(supervisor.pid, "sleep", 2)
    supervisor.kill()
    supervisor.wait()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in agent_pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(pid) for pid in agent_pids)


def test_unprivileged_mode_through_a_user_namespace(tmp_path):
    script = ("import sys; from compartment import Policy, run;"
              "r = run(['/usr/bin/python3', '-I', '-c', sys.argv[2], 'facts'],"
              " Policy.load('filter')); sys.exit(r.exit_status)")
    venv_python = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __import__("compartment").__file__))), ".venv", "bin", "python")
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             venv_python, "-c", script, "", PROBE],
                            capture_output=True, stdin=subprocess.DEVNULL, cwd="/")
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["uid"] == [65534] * 3
    assert facts["pid"] == 2 and facts["hostname"].startswith("compartment-")
    assert facts["caps"]["effective"] == 0 and facts["caps"]["bounding"] == 0
    assert facts["no_new_privs"] == 1 and facts["seccomp"] == 2


def _wait_for_children_of(parent: int, name: str, count: int) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [pid for pid in _descendants(parent) if _comm(pid) == name]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    raise AssertionError(f"the agent's {count} {name} processes never appeared")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("code, syscall", [
    ("import os; open(D + '/f', 'w').close(); os.chmod(D + '/f', 0o4755)", "chmod"),
    ("import os; os.close(os.open(D + '/g', os.O_CREAT | os.O_WRONLY, 0o2755))", "openat"),
    ("import os; os.mkdir(D + '/d', 0o2755)", "mkdir"),
])
def test_seccomp_refuses_setuid_and_setgid_modes(tmp_path, code, syscall):
    """A set-id file left in the writable directory would run with the agent's ids outside,
    where that filesystem is not mounted nosuid."""
    tmp_path.chmod(0o755)
    os.chown(tmp_path, 65534, 65534)
    ran = run_agent([PYTHON, "-I", "-c", f"D = {str(tmp_path)!r}; {code}"], "deliver",
                    overrides={"filesystem.writable": str(tmp_path),
                               "exit.require_full_read": "false"})
    assert ran.result.outcome is Outcome.VIOLATION, ran.stderr
    assert ran.result.denied_syscall == syscall
    assert not any(p.stat().st_mode & 0o6000 for p in tmp_path.iterdir())


def test_seccomp_keeps_the_agent_off_the_inits_limits():
    """The init has the agent's uid: lowering its hard CPU limit would have the kernel kill it,
    and the agent's own end would look like the runner's failure."""
    code = "import resource; resource.prlimit(1, resource.RLIMIT_CPU, (0, 0)); print('lowered')"
    ran = run_agent([PYTHON, "-I", "-c", code])
    assert ran.result.outcome is Outcome.VIOLATION, ran.result.reason
    assert ran.result.denied_syscall == "prlimit64" and ran.stdout == b""


def test_init_is_out_of_the_agents_reach_in_a_user_namespace():
    """Unprivileged, the init has the agent's uid: it must be neither readable nor killable."""
    code = ("import os, signal\nfor path in ('/proc/1/environ', '/proc/1/mem'):\n"
            "    try:\n        open(path, 'rb').read(1); print('read', path)\n"
            "    except OSError as e:\n        print('refused', e.errno)\n"
            "os.kill(1, signal.SIGKILL); os.kill(1, signal.SIGTERM); print('alive')")
    script = ("import sys; from compartment import Policy, run;"
              "r = run(['/usr/bin/python3', '-I', '-c', sys.argv[1]],"
              " Policy.load('filter', {'filesystem.proc': 'true'}));"
              "print(r.outcome, r.exit_status, file=sys.stderr); sys.exit(r.exit_status)")
    venv_python = Path(__import__("compartment").__file__).parent.parent / ".venv/bin/python"
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             str(venv_python), "-c", script, code], capture_output=True,
                            stdin=subprocess.DEVNULL, cwd="/", env={"SECRET": "s3cret"})
    assert result.stdout.decode().split("\n")[:3] == ["refused 13", "refused 13", "alive"]
    assert result.returncode == 0 and b"ok 0" in result.stderr


@pytest.mark.parametrize("code", ["import os; os.memfd_create('x')",
                                  "import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
                                  "libc.shmget(0, 1 << 30, 0o1600) < 0 or exit(9); "
                                  "raise OSError(ctypes.get_errno(), 'shmget')"])
def test_seccomp_refuses_memory_outside_the_address_space_limit(code):
    """memfd and SysV segments hold memory that RLIMIT_AS does not count."""
    ran = run_agent([PYTHON, "-I", "-c", code])
    assert ran.result.agent_status == 1
    assert b"OSError: [Errno 38]" in ran.stderr  # ENOSYS


def test_seccomp_refuses_fallocate_that_reserves_blocks_beyond_the_size(tmp_path):
    """FALLOC_FL_KEEP_SIZE reserves blocks without growing st_size, the one thing
    RLIMIT_FSIZE bounds: a file of size 0 held 256 MiB of the mail directory's disk."""
    tmp_path.chmod(0o755)
    os.chown(tmp_path, 65534, 65534)
    ran = probe("reserve", f"{tmp_path}/reserved", policy="deliver",
                overrides={"filesystem.writable": str(tmp_path),
                           "exit.require_full_read": "false"})
    assert ran.json() == {"errno": 95, "blocks": 0, "size": 0}, ran.stderr  # EOPNOTSUPP
    assert (tmp_path / "reserved").stat().st_blocks == 0
    # the same on a private copy of the message, which the agent may write
    ran = probe("reserve", "-", message=b"a message\n", overrides={"message.stdin": "file"})
    assert ran.json()["errno"] == 95 and ran.json()["size"] == 10
    assert ran.json()["blocks"] * 512 < 1 << 20


def test_fallocate_that_grows_the_file_meets_the_file_size_limit(tmp_path):
    """Mode 0 (posix_fallocate) grows st_size, so limits.file_bytes applies to it."""
    tmp_path.chmod(0o755)
    os.chown(tmp_path, 65534, 65534)
    code = (f"import os; fd = os.open({str(tmp_path)!r} + '/grown', os.O_RDWR | os.O_CREAT); "
            "os.posix_fallocate(fd, 0, 256 << 20)")
    ran = run_agent([PYTHON, "-I", "-c", code], "deliver",
                    overrides={"filesystem.writable": str(tmp_path), "limits.file_bytes": "1M",
                               "exit.require_full_read": "false"})
    assert b"OSError: [Errno 27]" in ran.stderr  # EFBIG (Python ignores SIGXFSZ)
    assert (tmp_path / "grown").stat().st_blocks * 512 <= 1 << 20


def test_allow_list_that_allows_fallocate_still_refuses_its_modes(static_reserve):
    """An allow-list policy that names fallocate gets mode 0 only."""
    overrides = {"seccomp.allow": "fallocate", "message.stdin": "file", "limits.file_bytes": "1M"}
    ran = run_agent([static_reserve], "strict", b"message\n", overrides)
    assert ran.stdout == b"95 0\n", ran.stderr  # KEEP_SIZE: EOPNOTSUPP; mode 0: done
    assert run_agent([static_reserve], "strict", b"m\n",
                     {"message.stdin": "file"}).result.denied_syscall == "fallocate"


STDIN_WRITER = """import os
try:
    os.write(0, b"AGENT-WROTE"); said = "wrote"
except OSError as err:
    said = f"refused {err.errno}"
data = b""
while chunk := os.read(0, 65536):
    data += chunk
print(said, len(data))
"""
TYPED = b"a message typed on a terminal\n"


def _stdin_of_each_kind(kind: str, tmp_path: Path):
    """(the agent's stdin, what the caller sees afterwards, the stdout if not a file)."""
    if kind == "terminal":
        controller, terminal = os.openpty()
        os.write(controller, TYPED + b"\x04")  # a line, then end-of-file
        os.set_blocking(controller, False)
        return terminal, lambda: _drain(controller), (terminal, controller)
    if kind == "file":
        (tmp_path / "msg").write_bytes(TYPED)
        fd = os.open(tmp_path / "msg", os.O_RDWR)
        return fd, lambda: (tmp_path / "msg").read_bytes() + b"@%d" % os.lseek(fd, 0, 1), (fd,)
    if kind == "pipe":
        read_end, write_end = os.pipe()
        os.write(write_end, TYPED)
        os.close(write_end)
        return read_end, lambda: b"", (read_end,)
    ours, theirs = socket.socketpair()
    ours.sendall(TYPED)
    ours.shutdown(socket.SHUT_WR)
    ours.setblocking(False)
    return theirs.fileno(), lambda: _drain(ours.fileno()), (ours, theirs)


def _drain(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EAGAIN, or EIO from a terminal whose other side is closed
        return b""


@pytest.mark.parametrize("kind", ["terminal", "file", "socket", "pipe"])
def test_stdin_is_read_only_whatever_the_caller_gave(kind, tmp_path):
    """The agent's fd 0 is for reading: nothing it writes there reaches the other side."""
    stdin, other_side, keep = _stdin_of_each_kind(kind, tmp_path)
    try:
        with open(tmp_path / "out", "w+b") as out, open(tmp_path / "err", "w+b") as err:
            result = run([PYTHON, "-I", "-c", STDIN_WRITER], Policy.load("filter"), stdin=stdin,
                         stdout=out, stderr=err)
            out.seek(0)
            said = out.read()
        seen = other_side()
    finally:
        for item in keep:
            item.close() if isinstance(item, socket.socket) else os.close(item)
    assert result.outcome is Outcome.OK, result.reason
    # EBADF from a read-only description; EPIPE from a socket shut down for writing
    assert said in (b"refused 9 %d\n" % len(TYPED), b"refused 32 %d\n" % len(TYPED)), said
    assert b"AGENT-WROTE" not in seen
    if kind == "file":  # unchanged, and the caller's offset where the agent stopped
        assert seen == TYPED + b"@%d" % len(TYPED)


@pytest.mark.parametrize("kind", ["file", "socket", "pipe"])
def test_require_full_read_holds_on_a_read_only_stdin(kind, tmp_path):
    policy = Policy.load("filter", {"exit.require_full_read": "true"})
    for agent, expected in ((["/bin/true"], Outcome.AGENT_FAILED), (["/bin/cat"], Outcome.OK)):
        stdin, _, keep = _stdin_of_each_kind(kind, tmp_path)
        try:
            with open(os.devnull, "wb") as sink:
                result = run(agent, policy, stdin=stdin, stdout=sink, stderr=sink)
        finally:
            for item in keep:
                item.close() if isinstance(item, socket.socket) else os.close(item)
        assert result.outcome is expected, (agent, result.reason)
        if kind == "file":
            assert result.bytes_in == (0 if expected is Outcome.AGENT_FAILED else len(TYPED))


def test_socket_that_is_also_stdout_is_copied_read_only(tmp_path):
    """A socket cannot be reopened, and shutting its write direction would cut the agent's
    output: the message is copied into a sealed read-only memfd instead."""
    ours, theirs = socket.socketpair()
    with ours, theirs, open(tmp_path / "err", "w+b") as err:
        ours.sendall(TYPED)
        ours.shutdown(socket.SHUT_WR)
        result = run([PYTHON, "-I", "-c", STDIN_WRITER], Policy.load("filter"), stdin=theirs,
                     stdout=theirs, stderr=err)
        theirs.shutdown(socket.SHUT_WR)
        said = ours.recv(65536)
    assert result.outcome is Outcome.OK, result.reason
    assert said == b"refused 9 %d\n" % len(TYPED)


def test_stdin_open_for_writing_only_is_no_message(tmp_path):
    """Unconfined, reading it fails; reopened read-only it would show the agent a file the
    caller never opened for reading."""
    (tmp_path / "log").write_bytes(b"not a message\n")
    fd = os.open(tmp_path / "log", os.O_WRONLY)
    try:
        with open(os.devnull, "wb") as sink:
            result = run(["/bin/cat"], Policy.load("filter"), stdin=fd, stdout=sink, stderr=sink)
    finally:
        os.close(fd)
    assert (result.outcome, result.exit_status) == (Outcome.CONFIG_ERROR, 75)
    assert result.reason == "stdin is open for writing only: there is no message to read"


def test_stdin_a_terminal_the_caller_cannot_reopen_is_refused_not_hung():
    """Another user's terminal handed down (su, sudo -u): it cannot be opened again
    read-only, and copying it would wait for an end that may never come."""
    controller, terminal = os.openpty()  # root's, mode 620: nobody may not open it
    script = ("import sys; from compartment import Policy, run;"
              "r = run(['/bin/cat'], Policy.load('filter'));"
              "print(r.reason, file=sys.stderr); sys.exit(r.exit_status)")
    venv_python = Path(__import__("compartment").__file__).parent.parent / ".venv/bin/python"
    try:
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 str(venv_python), "-c", script], stdin=terminal,
                                capture_output=True, cwd="/", timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.returncode == 75
    assert result.stderr.endswith(b"stdin cannot be opened again read-only (Permission denied); "
                                  b"give the message on a pipe or in a file\n")

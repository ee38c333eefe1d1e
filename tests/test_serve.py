"""The resident supervisor end to end: `compartment serve` with `compartment submit` and
compartment.submit(), against `compartment run` on the same agents."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest
from serving import PYTHON, Daemon, open_directory, raw_request, request, uid_processes, wait_for

from compartment import Outcome, Policy, protocol, run, submit

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="compartment serve runs as root (as "
                                "CI does)")
POOL = (65100, 65199)  # a uid range of these tests alone (the soak draws 63000-64999)
IN_POOL = [f"--set=identity.uid_pool={POOL[0]}-{POOL[1]}"]
PEER = 64010  # an unprivileged peer (no passwd entry needed)
STRANGER = 64011  # a peer no rule names


@pytest.fixture(scope="module")
def daemon():
    served = Daemon(config=f"""
[[allow]]
user = {PEER}
policies = ["filter", "strict"]
set = ["limits.wall_timeout_s", "limits.cpu_seconds", "environment.set.*"]
max_live = 4
""").start()
    yield served
    served.stop()


def test_a_message_through_the_daemon_byte_exact(daemon):
    message = bytes(range(256)) * 400
    done = daemon.submit(["/bin/cat"], message=message)
    assert (done.status, done.stdout, done.stderr) == (0, message, b"")
    assert "outcome=ok status=0" in daemon.log()


def test_the_api_returns_the_result(daemon):
    with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        stdin.write(b"x" * 1000)
        stdin.seek(0)
        result = submit(["/bin/cat"], "filter", stdin=stdin.fileno(), stdout=out.fileno(),
                        stderr=err.fileno(), socket_path=daemon.socket)
        out.seek(0)
        assert out.read() == b"x" * 1000
    assert (result.outcome, result.exit_status, result.bytes_in, result.bytes_out) == \
        (Outcome.OK, 0, 1000, 1000)
    assert result.uid is not None and result.uid >= 60000 and result.program == "/bin/cat"


AGENTS = [
    (["/bin/sh", "-c", "exit 67"], [], 67),
    # What a qmail caller gets for its agent's own codes is run's business (issue 9): the same.
    (["/bin/sh", "-c", "exit 99"], ["--exit-codes", "qmail"], None),
    (["/bin/sh", "-c", "exit 100"], ["--exit-codes", "qmail"], None),
    (["/bin/sh", "-c", "exit 99"], ["--agent-exit-codes", "qmail"], 0),
    (["/bin/sh", "-c", "exit 3"], [], 75),
    (["/bin/sh", "-c", "sleep 5"], ["--set", "limits.wall_timeout_s=0.2"], 75),
    ([PYTHON, "-I", "-c", "import socket; socket.socket(socket.AF_INET)"], [], 75),
    (["/bin/sh", "-c", "kill -9 $$"], [], 75),
    (["/nonexistent/agent"], [], 75),
    (["/nonexistent/agent"], ["--exit-codes", "qmail"], 111),
    (["/bin/true"], ["-p", "no-such-policy"], 75),
]


@pytest.mark.parametrize(("argv", "options", "status"), AGENTS)
def test_submit_says_what_run_says(daemon, argv, options, status):
    """Same exit status and same first stderr line as `compartment run`, for each outcome."""
    done = daemon.submit(argv, options)
    ran = subprocess.run([PYTHON, "-m", "compartment", "run", *options, "--", *argv],
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert done.status == ran.returncode
    assert status is None or done.status == status
    first = done.stderr.split(b"\n")[0]
    expected = ran.stderr.split(b"\n")[0]
    if b"refused" not in first:
        assert first == expected
    else:  # an unknown policy is refused by the daemon: the reason differs, the class not
        assert first.startswith(expected[:6]) and b"no-such-policy" in first


def test_report_is_written_as_the_peer(daemon, tmp_path):
    directory = open_directory() / "reports"
    directory.mkdir()
    os.chown(directory, PEER, PEER)
    report = directory / "r.jsonl"
    done = daemon.submit(["/bin/cat"], ["--report", str(report)], b"hi\n", user=PEER)
    assert done.status == 0, done.stderr
    record = json.loads(report.read_text())
    assert (record["outcome"], record["exit_status"], record["policy"]) == ("ok", 0, "filter")
    assert report.stat().st_uid == PEER  # created with the peer's own rights
    denied = tmp_path / "root-only.jsonl"  # tmp_path is root's, 0700 to the peer
    done = daemon.submit(["/bin/true"], ["--report", str(denied)], user=PEER)
    assert done.status == 0 and b"report" in done.stderr and not denied.exists()


def test_one_report_line_per_delivery_whatever_ends_it(daemon):
    """A violation ends with several descriptors ready at once (listener, status, pidfd): the
    delivery is answered and reported once, as what it was."""
    directory = open_directory()
    report = directory / "r.jsonl"
    agents = [[PYTHON, "-I", "-c", "import socket; socket.socket(socket.AF_INET)"],
              ["/bin/sh", "-c", "exit 3"], ["/bin/cat"]] * 4
    for agent in agents:
        daemon.submit(agent, ["--report", str(report)])
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["outcome"] for r in records] == ["violation", "agent-failed", "ok"] * 4


def test_a_closed_watch_ignores_events_still_queued_for_it():
    """The daemon's loop may hold events of one poll() round for a watch that an earlier event
    of the same round finished and closed: they must be no-ops (they were a crash, and the
    delivery was answered twice)."""
    from compartment.watch import Watch

    with open("/dev/null", "wb") as null:
        watch = Watch(Policy.load("filter").limits, (0, null.fileno(), null.fileno()), {})
        dummy = os.open("/dev/null", os.O_RDONLY)
        watch.listener = dummy  # as if the agent's seccomp listener had come
        watch._handlers = {dummy: watch._on_notification}
        watch.close()
        watch.on_event(dummy, select.POLLIN | select.POLLHUP)  # raised ValueError on fd -1
    assert watch.finished


SEEK = [PYTHON, "-I", "-c", "import os, sys; os.lseek(0, 0, 0); sys.stdout.buffer.write("
        "os.read(0, 100)); os.lseek(0, 0, 0); sys.stdout.buffer.write(os.read(0, 5))"]


@pytest.mark.parametrize("mode", ["memfd", "file"])
def test_a_copy_of_the_message_when_the_policy_wants_one(daemon, mode):
    """message.stdin = memfd or file: the agent reads a seekable copy, also of a pipe (made by
    the daemon without blocking), as under `compartment run`."""
    sets = ["--set", f"message.stdin={mode}"]
    done = daemon.submit(SEEK, sets, b"from a file")
    assert (done.status, done.stdout) == (0, b"from a filefrom "), done.stderr
    client = subprocess.Popen([daemon_command(), "submit", "--socket", daemon.socket, *sets,
                               "--", *SEEK], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    client.stdin.write(b"from a pipe, ")
    client.stdin.flush()
    time.sleep(0.3)  # the daemon has part of it, and serves others meanwhile
    assert daemon.submit(["/bin/echo", "meanwhile"]).stdout == b"meanwhile\n"
    out, _ = client.communicate(b"slowly", timeout=60)
    assert (client.returncode, out) == (0, b"from a pipe, slowlyfrom ")
    too_big = daemon.submit(["/bin/cat"], [*sets, "--set", "message.max_bytes=4"], b"12345")
    assert too_big.status == 75 and b"larger than message.max_bytes" in too_big.stderr


def test_a_long_delivery_tells_its_client_how_long_to_wait(daemon, monkeypatch):
    """Past ACCEPTED_AFTER_S the daemon sends the compartment's timeout; a client that heard
    nothing gives up after its own first wait (a wedged daemon must not hold mail forever)."""
    import compartment.client

    monkeypatch.setattr(compartment.client, "START_WAIT_S", 2.0)
    with open("/dev/null", "r+b") as null:
        result = submit(["/bin/sleep", "12"], "filter", stdin=null.fileno(),
                        stdout=null.fileno(), stderr=null.fileno(), socket_path=daemon.socket)
    assert (result.outcome, result.exit_status) == (Outcome.INTERNAL_ERROR, 75)
    assert "no answer from the daemon in time" in result.reason
    monkeypatch.setattr(compartment.client, "START_WAIT_S", 11.0)  # past ACCEPTED_AFTER_S
    with open("/dev/null", "r+b") as null:
        result = submit(["/bin/sleep", "12"], "filter", stdin=null.fileno(),
                        stdout=null.fileno(), stderr=null.fileno(), socket_path=daemon.socket,
                        overrides=["limits.wall_timeout_s=20"])
    assert (result.outcome, result.exit_status) == (Outcome.OK, 0)


def test_the_daemon_unreachable_is_a_temporary_failure(tmp_path):
    for options, status, first in (([], 75, b"4.3.0 compartment: cannot reach the daemon"),
                                   (["--exit-codes", "qmail"], 111,
                                    b"compartment: cannot reach the daemon")):
        done = Daemon().submit(["/bin/true"], options)
        assert done.status == status and done.stderr.startswith(first)


def test_a_peer_without_a_rule_is_refused(daemon):
    done = daemon.submit(["/bin/true"], user=STRANGER)
    assert done.status == 75
    assert done.stderr.startswith(b"4.3.5 compartment: refused: uid 64011")
    assert f"refused peer=uid:{STRANGER}" in daemon.log()
    qmail = daemon.submit(["/bin/true"], ["--exit-codes", "qmail"], user=STRANGER)
    assert qmail.status == 111 and qmail.stderr.startswith(b"compartment: refused")


@pytest.mark.parametrize(("options", "why"), [
    (["-p", "deliver"], b"policy deliver is not allowed"),
    (["--set", "identity.uid=1000"], b"--set identity.uid is not allowed"),
    (["--set", "seccomp.default=allow"], b"--set seccomp.default is not allowed"),
    (["--set", "limits.cpu_seconds=1000"], b"1000 is above the policy's 120"),
    (["--set", "limits.wall_timeout_s=1h"], b"3600.0 is above the policy's"),
    (["--set", "filesystem.writable=/tmp"], b"--set filesystem.writable is not allowed"),
])
def test_what_a_rule_does_not_grant_is_refused(daemon, options, why):
    done = daemon.submit(["/bin/true"], options, user=PEER)
    assert done.status == 75 and why in done.stderr, done.stderr


def test_what_a_rule_grants_is_run(daemon):
    done = daemon.submit(["/bin/sh", "-c", "echo $X"], ["-p", "strict", "--set",
                                                      "limits.cpu_seconds=5"], user=PEER)
    assert done.status == 75 and b"exec" in done.stderr  # strict: no /bin/sh, but it ran
    done = daemon.submit(["/usr/bin/env"], ["--set", "environment.set.X=one", "--set",
                                            "limits.wall_timeout_s=10"], user=PEER)
    assert done.status == 0 and b"X=one\n" in done.stdout


def test_the_environment_reaches_only_what_the_policy_passes(daemon):
    env = {**os.environ, "SENDER": "a@example.org", "SECRET": "x"}
    done = subprocess.run([PYTHON, "-m", "compartment", "submit",
                           "--socket", daemon.socket, "--", "/usr/bin/env"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0 and b"SECRET" not in done.stdout
    assert b"SENDER=a@example.org\n" in done.stdout  # filter passes the envelope


def test_the_status_is_for_root_and_permitted_peers(daemon):
    shown = subprocess.run([daemon_command(), "status", "--socket", daemon.socket],
                           capture_output=True, timeout=30, check=False)
    assert shown.returncode == 0 and b"live compartments:" in shown.stdout
    assert b"latency" in shown.stdout and b"requests since start" in shown.stdout
    refused = subprocess.run([daemon_command(), "status", "--socket", daemon.socket],
                             capture_output=True, timeout=30, check=False, user=PEER,
                             group=PEER, extra_groups=[])
    assert refused.returncode == 75 and b"may not ask for the status" in refused.stderr


def daemon_command() -> str:
    from serving import COMMAND

    return COMMAND


# What a peer might send instead of a request.

@pytest.mark.parametrize(("data", "why"), [
    (b"", "shorter than its header"),
    (b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n", "bad magic"),
    (b"\0" * 64, "bad magic"),
    (request(["/bin/true"])[:-3], "lengths add up"),
    (request(["/bin/true"]) + b"trailing", "lengths add up"),
    (request(["/bin/true"], policy="../../etc/x"), "the policy must be a name"),
    (request(["/bin/true"], policy="/tmp/mine.toml"), "the policy must be a name"),
    (request(["/bin/true"], flags=1 << 9), "unknown flags"),
    (request(["/bin/true"], sets=["novalue"]), "expected KEY=VALUE"),
    (request([]), "no program given"),
    (b"CMPQ" + b"\0" * (protocol.MAX_REQUEST_BYTES + 16), "request larger than"),
])
def test_garbage_is_refused_with_a_reason(daemon, data, why):
    with open("/dev/null", "r+b") as null:
        kind, answer = raw_request(daemon.socket, data, [null.fileno()] * 3)
    assert kind == protocol.RESULT and answer["refused"] and why in answer["reason"]


def test_descriptors_must_match_the_request_and_the_policy(daemon):
    with open("/dev/null", "r+b") as null:
        kind, answer = raw_request(daemon.socket, request(["/bin/true"]), [null.fileno()] * 2)
        assert "lists 3 descriptors but 2 came" in answer["reason"]
        four = request(["/bin/true"], fds=(0, 1, 2, 3))
        kind, answer = raw_request(daemon.socket, four, [null.fileno()] * 4)
        assert "policy filter takes 0, 1, 2 and no other" in answer["reason"]
        kind, answer = raw_request(daemon.socket, request(["/bin/true"]),
                                   [null.fileno()] * (protocol.MAX_FDS + 2))
        assert "more than 16 descriptors" in answer["reason"]


def test_a_second_request_on_one_connection_stops_the_first_and_is_refused(daemon):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(30)
    sock.connect(daemon.socket)
    with open("/dev/null", "r+b") as null:
        first = request(["/bin/sleep", "20"], sets=IN_POOL[0].removeprefix("--set=").split())
        socket.send_fds(sock, [first], [null.fileno()] * 3)
        assert wait_for(lambda: uid_processes(POOL, "sleep"), 20)
        socket.send_fds(sock, [request(["/bin/true"])], [null.fileno()] * 3)
        started = time.monotonic()
        kind, answer = protocol.decode_answer(sock.recv(protocol.MAX_ANSWER_BYTES))
    sock.close()
    assert (answer["outcome"], answer["exit_status"]) == ("internal-error", 75)
    assert "a second request on one connection" in answer["reason"]
    assert time.monotonic() - started < 15  # the sleep was stopped, not waited for
    assert wait_for(lambda: not uid_processes(POOL, "sleep"), 10)
    assert "refused peer=uid:0" in daemon.log()


def test_a_peer_gets_no_more_than_its_max_live_compartments_at_once(daemon):
    sleepers = [subprocess.Popen([daemon_command(), "submit", "--socket", daemon.socket, "--",
                                  "/bin/sleep", "5"], stdin=subprocess.DEVNULL, user=PEER,
                                 group=PEER, extra_groups=[]) for _ in range(4)]  # max_live
    try:
        assert wait_for(lambda: b"live compartments: 4" in subprocess.run(
            [daemon_command(), "status", "--socket", daemon.socket], capture_output=True,
            timeout=30, check=False).stdout, 20)
        fifth = daemon.submit(["/bin/true"], user=PEER)
        assert fifth.status == 75 and b"its limit" in fifth.stderr, fifth.stderr
        assert daemon.submit(["/bin/true"]).status == 0  # another peer (root) still served
    finally:
        for sleeper in sleepers:
            sleeper.wait(timeout=60)
    assert all(s.returncode == 0 for s in sleepers)


def test_a_client_that_sends_its_own_socket_as_stdout_is_refused(daemon):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(daemon.socket)
    with open("/dev/null", "rb") as null:
        socket.send_fds(sock, [request(["/bin/cat"])], [null.fileno(), sock.fileno(),
                                                          sock.fileno()])
    kind, answer = protocol.decode_answer(sock.recv(protocol.MAX_ANSWER_BYTES))
    sock.close()
    assert answer["refused"] and "stdout must be a pipe, a file or /dev/null" in answer["reason"]


def test_a_terminal_as_stdout_is_relayed_by_the_client(daemon):
    """The daemon never writes to a terminal (it could block it); submit puts a pipe between."""
    controller, terminal = os.openpty()
    try:
        done = daemon.submit(["/bin/echo", "through the relay"], stdout=terminal)
        assert done.status == 0
        assert b"through the relay" in os.read(controller, 4096)
    finally:
        os.close(controller)
        os.close(terminal)


def test_a_full_pipe_for_both_streams_does_not_stall_the_daemon(daemon):
    """A client hands one pipe, already full, as stdout and stderr, and never reads it: its
    delivery times out, and the daemon serves others meanwhile."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"f" * 65536)
    except BlockingIOError:
        os.set_blocking(write_end, True)  # full; and as a caller's pipe is
    agent = ["/bin/sh", "-c", "echo first; sleep 0.1; head -c 200000 /dev/zero"]
    client = subprocess.Popen([daemon_command(), "submit", "--socket", daemon.socket, "--set",
                               "limits.wall_timeout_s=1", "--", *agent],
                              stdin=subprocess.DEVNULL, stdout=write_end, stderr=write_end)
    os.close(write_end)
    try:
        time.sleep(0.5)
        assert daemon.submit(["/bin/echo", "served"]).stdout == b"served\n"
        time.sleep(1.5)  # past the stalled delivery's deadline
        while client.poll() is None:
            os.read(read_end, 65536)  # now drain, so that the client can write its reason
        assert client.returncode == 75
    finally:
        os.close(read_end)
        client.kill()


def test_a_silent_client_is_dropped_and_others_are_served(daemon):
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    silent.connect(daemon.socket)
    silent.settimeout(30)
    started = time.monotonic()
    assert daemon.submit(["/bin/true"]).status == 0  # served meanwhile
    kind, answer = protocol.decode_answer(silent.recv(protocol.MAX_ANSWER_BYTES))
    assert "no request within" in answer["reason"]
    assert time.monotonic() - started < 20
    silent.close()


def test_many_idle_connections_do_not_stop_a_delivery(daemon):
    idle = []
    try:
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.connect(daemon.socket)
            idle.append(sock)
        assert daemon.submit(["/bin/echo", "still here"]).stdout == b"still here\n"
    finally:
        for sock in idle:
            sock.close()


def test_a_client_that_disconnects_mid_delivery_has_its_compartment_killed(daemon):
    client = subprocess.Popen([daemon_command(), "submit", "--socket", daemon.socket,
                               *IN_POOL, "--", "/bin/sleep", "60"], stdin=subprocess.DEVNULL)
    assert wait_for(lambda: uid_processes(POOL, "sleep"), 20)
    client.kill()
    client.wait()
    assert wait_for(lambda: not uid_processes(POOL, "sleep"), 10), \
        "the agent outlived its client"
    assert wait_for(lambda: "the client had disconnected" in daemon.log(), 10)


def test_64_concurrent_clients(daemon):
    results: list[tuple[int, bytes]] = []

    def one(i: int) -> None:
        done = daemon.submit(["/bin/cat"], message=b"message %d\n" % i)
        results.append((done.status, done.stdout))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == sorted((0, b"message %d\n" % i) for i in range(64))


def test_run_and_the_api_agree_on_a_result(daemon):
    policy = Policy.load("filter", {"limits.output_bytes": "10"})
    flood = [PYTHON, "-I", "-c", "while True: print('x' * 100, flush=True)"]  # always killed
    with tempfile.TemporaryFile() as out, open("/dev/null", "rb") as null:
        ran = run(flood, policy, stdin=null, stdout=out, stderr=out)
        got = submit(flood, "filter", stdin=null.fileno(), stdout=out.fileno(),
                     stderr=out.fileno(), socket_path=daemon.socket,
                     overrides=["limits.output_bytes=10"])
    for name in ("outcome", "exit_status", "reason", "agent_status", "agent_signal",
                 "bytes_in", "bytes_out", "program", "policy"):
        assert getattr(got, name) == getattr(ran, name), name


def test_the_cpu_of_every_process_is_counted_when_answered_before_the_teardown(daemon):
    """The daemon answers when the init says the compartment is empty, with the usage the
    init's own wait4 gathered (its reaping comes later): a child's CPU is in it."""
    burn = [PYTHON, "-I", "-c", "import os, time\nos.fork()\nend = time.process_time() + 0.3"
            "\nwhile time.process_time() < end: pass"]
    with open("/dev/null", "r+b") as null:
        got = submit(burn, "filter", stdin=null.fileno(), stdout=null.fileno(),
                     stderr=null.fileno(), socket_path=daemon.socket)
        ran = run(burn, Policy.load("filter"), stdin=null, stdout=null, stderr=null)
    assert got.outcome is Outcome.OK and ran.outcome is Outcome.OK
    assert got.cpu_s >= 0.55 and ran.cpu_s >= 0.55  # two processes of 0.3 s each
    assert got.peak_memory_bytes > 1 << 20 and ran.peak_memory_bytes > 1 << 20


def test_a_compartment_prepared_ahead_is_confined_as_a_cloned_one(daemon):
    """The second and later deliveries of a policy are committed to compartments prepared
    ahead: the same confinement, facts for facts, as a clone for the request and as `run`,
    and never one compartment for two requests."""
    from agentrun import PROBE, probe
    from agentrun import PYTHON as SYSTEM_PYTHON  # in the prepared root: /usr

    ran = probe("facts").json()
    shown = []
    for _ in range(4):
        done = daemon.submit([SYSTEM_PYTHON, "-I", "-c", PROBE, "facts"], IN_POOL)
        assert done.status == 0, done.stderr
        shown.append(json.loads(done.stdout))
    status = subprocess.run([daemon_command(), "status", "--socket", daemon.socket],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    used = int(status.split("prepared ahead and used: ")[1].split(",")[0])
    assert used >= 3, status  # all but the first, at least
    varying = ("uid", "gid", "hostname")
    for facts in shown:
        assert {k: v for k, v in facts.items() if k not in varying} == \
            {k: v for k, v in ran.items() if k not in varying}
        assert POOL[0] <= facts["uid"][0] <= POOL[1] and len(set(facts["uid"])) == 1
    # Four compartments (each names itself anew); a pool uid released after its compartment was
    # reaped may be leased again, so the uids need not all differ.
    assert len({f["hostname"] for f in shown}) == 4


# The daemon's own life.

def test_sigkill_mid_delivery_defers_every_message_and_a_restart_serves(tmp_path):
    pool = (65200, 65299)  # this test's own: the module's daemon keeps one prepared in POOL
    daemon = Daemon().start()
    clients = [subprocess.Popen([daemon_command(), "submit", "--socket", daemon.socket,
                                 f"--set=identity.uid_pool={pool[0]}-{pool[1]}", "--",
                                 "/bin/sleep", "60"], stdin=subprocess.DEVNULL,
                                stderr=subprocess.PIPE) for _ in range(3)]
    assert wait_for(lambda: len(uid_processes(pool, "sleep")) >= 3, 30)
    daemon.stop(signal.SIGKILL)
    for client in clients:
        _, err = client.communicate(timeout=30)
        assert client.returncode == 75 and b"closed the connection" in err
    # Inits, agents and the compartment prepared ahead: nothing of that uid range is left.
    assert wait_for(lambda: not uid_processes(pool), 10), "an agent outlived its daemon"
    daemon.start()
    try:
        assert daemon.submit(["/bin/echo", "again"]).stdout == b"again\n"
    finally:
        daemon.stop()


def test_a_child_whose_supervisor_died_before_its_parent_death_signal_stops():
    """The parent-death signal is set after the clone: a supervisor (daemon) killed before that
    leaves a child no signal will reach.  It sees the status socket hung up, and stops."""
    from compartment.confine import session

    def child_status(close_other_end: bool) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if close_other_end:
            ours.close()
        pid = os.fork()
        if pid == 0:
            if not close_other_end:
                ours.close()  # the parent still holds its copy
            session.supervisor_alive(theirs)
            os._exit(0)
        theirs.close()
        status = os.waitpid(pid, 0)[1]
        if not close_other_end:
            ours.close()
        return os.waitstatus_to_exitcode(status)

    assert child_status(close_other_end=False) == 0
    assert child_status(close_other_end=True) == 1


def test_sigterm_finishes_what_runs_and_refuses_new_work(tmp_path):
    daemon = Daemon().start()
    client = subprocess.Popen([daemon_command(), "submit", "--socket", daemon.socket, "--",
                               "/bin/sh", "-c", "sleep 1; echo finished"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert wait_for(lambda: "ok" not in daemon.log() and _live(daemon), 20)
    daemon.process.send_signal(signal.SIGTERM)
    assert wait_for(lambda: not os.path.exists(daemon.socket) or _refuses(daemon), 10)
    out, _ = client.communicate(timeout=30)
    assert (client.returncode, out) == (0, b"finished\n")
    assert daemon.process.wait(timeout=30) == 0


def _live(daemon: Daemon) -> bool:
    shown = subprocess.run([daemon_command(), "status", "--socket", daemon.socket],
                           capture_output=True, timeout=30, check=False)
    return b"live compartments: 1" in shown.stdout


def _refuses(daemon: Daemon) -> bool:
    done = daemon.submit(["/bin/true"])
    return done.status == 75


def test_sighup_reloads_the_configuration(tmp_path):
    daemon = Daemon().start()  # no configuration: root only
    try:
        assert daemon.submit(["/bin/true"], user=PEER).status == 75
        daemon.write_config(f"[[allow]]\nuser = {PEER}\npolicies = [\"filter\"]\n")
        daemon.reload()
        assert daemon.submit(["/bin/true"], user=PEER).status == 0
        daemon.write_config("[[allow]]\nbogus = 1\n")  # a bad file: the old one stays
        daemon.reload()
        assert "reload refused" in daemon.log()
        assert daemon.submit(["/bin/true"], user=PEER).status == 0
    finally:
        daemon.stop()


def test_socket_activation_and_readiness_notification():
    """As systemd starts it: the listening socket as fd 3 (LISTEN_PID, LISTEN_FDS), READY=1
    and STOPPING=1 on $NOTIFY_SOCKET."""
    directory = open_directory()
    path = str(directory / "activated")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(directory / "notify"))
    notify.settimeout(30)
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; "
                "os.execv(sys.argv[2], sys.argv[2:])")
    daemon = subprocess.Popen([PYTHON, "-c", launcher, str(listener.fileno()), daemon_command(),
                               "serve", "--config", str(directory / "none.toml"), "--socket",
                               str(directory / "not-this-one"), "--log", "stderr"],
                              pass_fds=[listener.fileno()],
                              env={**os.environ, "NOTIFY_SOCKET": str(directory / "notify")},
                              stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listener.close()
    try:
        assert notify.recv(4096).startswith(b"READY=1")
        done = subprocess.run([daemon_command(), "submit", "--socket", path, "--", "/bin/echo",
                               "activated"], capture_output=True, timeout=60, check=False)
        assert (done.returncode, done.stdout) == (0, b"activated\n")
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        daemon.kill()
        notify.close()

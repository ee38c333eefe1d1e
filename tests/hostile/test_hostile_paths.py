"""The user next door hands the supervisor a path: a link in a mailbox's place, a directory
swapped between the check and the mount, a policy file others can rewrite, a forged cache of
compiled filters, a report path that is a link or a FIFO.  None of them chooses who the agent
runs as, what it may write, which filter binds it, or what root appends to."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hostile_evidence import MAIL_UID, NOBODY
from hostile_run import HOSTILE_POOL, MESSAGE

import compartment
import compartment.filtering
from compartment import Outcome, Policy, policy, supervisor, syscall_filter
from compartment.confine import errors, filesystem
from compartment.rootfs import Entry

PYTHON = "/usr/bin/python3"
VICTIM_UID = 61236  # bob: the mailbox owner the link points at
# A delivery agent: who it runs as, and a file in the mailbox to prove it wrote there.
DELIVER = ("import os, sys; d = sys.argv[1]; sys.stdin.buffer.read(); "
           "open(os.path.join(d, 'delivered'), 'w').write(str(os.getuid())); print(os.getuid())")


def mailbox(path: Path, uid: int) -> Path:
    path.mkdir(parents=True)
    os.chown(path, uid, uid)
    path.chmod(0o700)
    return path


def run(argv: list[str], pol: Policy, case_dir: Path, **options: object) -> compartment.Result:
    with open(case_dir / "msg", "wb") as file:
        file.write(MESSAGE)
    with open(case_dir / "msg", "rb") as stdin, open(case_dir / "out", "wb") as out, \
            open(case_dir / "err", "wb") as err:
        return compartment.run(argv, pol, stdin=stdin, stdout=out, stderr=err, **options)


def deliver_policy(maildir: Path) -> Policy:
    return Policy.load("deliver", {"filesystem.writable": str(maildir),
                                   "identity.uid_pool": HOSTILE_POOL})


def test_a_linked_mailbox_does_not_choose_the_agents_uid(case_dir: Path) -> None:
    """alice makes ~/Maildir a link to bob's: the agent must not run as bob in bob's box."""
    bob = mailbox(case_dir / "bob" / "Maildir", VICTIM_UID)
    alice_home = mailbox(case_dir / "alice", MAIL_UID)
    alice_home.chmod(0o755)
    os.symlink(bob, alice_home / "Maildir")
    os.lchown(alice_home / "Maildir", MAIL_UID, MAIL_UID)
    result = run([PYTHON, "-c", DELIVER, str(alice_home / "Maildir")],
                 deliver_policy(alice_home / "Maildir"), case_dir)
    assert (result.outcome, result.exit_status) == (Outcome.CONFIG_ERROR, 75), result.reason
    assert "is a symbolic link owned by uid 61235" in result.reason
    assert not (bob / "delivered").exists()


@pytest.mark.parametrize("what", ["readable", "program"])
def test_a_users_link_is_not_followed_to_read_or_run(case_dir: Path, what: str) -> None:
    secret = mailbox(case_dir / "bob", VICTIM_UID)
    (secret / "key").write_text("bob's secret\n")
    target = secret if what == "readable" else Path("/usr/bin/id")
    link = case_dir / "link"
    os.symlink(target, link)
    os.lchown(link, MAIL_UID, MAIL_UID)
    overrides = {"identity.uid_pool": HOSTILE_POOL}
    argv = ["/bin/cat", f"{link}/key"] if what == "readable" else [str(link)]
    if what == "readable":
        overrides["filesystem.readable"] = str(link)
    result = run(argv, Policy.load("filter", overrides), case_dir)
    assert result.outcome is Outcome.CONFIG_ERROR, result.reason
    assert "symbolic link owned by uid 61235" in result.reason
    assert b"secret" not in (case_dir / "out").read_bytes()


def test_a_mailbox_swapped_after_the_check_is_not_what_is_mounted(case_dir: Path,
                                                                   monkeypatch) -> None:
    """Between the decision (owner, type) and the clone, alice renames her checked mailbox away
    and puts a link to bob's in its place: what the agent gets is still what was checked."""
    alice = mailbox(case_dir / "alice" / "Maildir", MAIL_UID)
    bob = mailbox(case_dir / "bob" / "Maildir", VICTIM_UID)
    real_spawn = supervisor.spawn

    def swap_then_spawn(plan):  # noqa: ANN001, ANN202 - stands in for supervisor.spawn
        alice.rename(case_dir / "alice" / "checked")
        os.symlink(bob, alice)
        return real_spawn(plan)

    monkeypatch.setattr(supervisor, "spawn", swap_then_spawn)
    result = run([PYTHON, "-c", DELIVER, str(alice)], deliver_policy(alice), case_dir)
    assert result.outcome is Outcome.OK, result.reason
    assert (case_dir / "out").read_bytes() == f"{MAIL_UID}\n".encode()
    assert (case_dir / "alice" / "checked" / "delivered").read_text() == str(MAIL_UID)
    assert not (bob / "delivered").exists()


def test_an_unprivileged_childs_second_look_must_find_the_same_file(tmp_path: Path) -> None:
    """Unprivileged, the child opens the path again: a different file there is refused."""
    (tmp_path / "checked").mkdir()
    (tmp_path / "other").mkdir()
    checked = os.stat(tmp_path / "checked")
    fd = os.open(tmp_path / "other", os.O_PATH)
    try:
        entry = Entry("rw", str(tmp_path / "other"), str(tmp_path / "other"), True, fd=fd,
                      identity=(checked.st_dev, checked.st_ino))
        with pytest.raises(errors.SetupError, match="replaced after the supervisor checked"):
            filesystem._source(entry)
    finally:
        os.close(fd)


@pytest.mark.parametrize("flaw", ["group-writable", "user's file", "writable directory"])
def test_root_refuses_a_policy_others_could_rewrite(case_dir: Path, flaw: str) -> None:
    directory = case_dir / "etc"
    directory.mkdir(mode=0o755)
    file = directory / "mine.toml"
    file.write_text('description = "x"\n[identity]\nuid = 61236\ngid = 61236\n')
    file.chmod(0o644)
    if flaw == "group-writable":
        file.chmod(0o664)
    elif flaw == "user's file":
        os.chown(file, MAIL_UID, MAIL_UID)
    else:
        directory.chmod(0o777)
    done = subprocess.run([sys.executable, "-m", "compartment", "run", "-p", str(file), "--",
                           "/usr/bin/id", "-u"], stdin=subprocess.DEVNULL, capture_output=True,
                          check=False)
    assert done.returncode == 75 and done.stdout == b""
    reason = done.stderr.decode()
    assert reason.startswith(f"4.3.5 compartment: policy: {file}: cannot read policy: ")
    named = {"group-writable": "policy: writable by its group (mode 0664)",
             "user's file": "policy: owned by uid 61235, not root",
             "writable directory": f"{directory}: writable by its group and others (mode "
                                   "0777)"}[flaw]
    assert named in reason


def test_policy_names_look_in_the_administrators_directory_first(case_dir: Path,
                                                                  monkeypatch) -> None:
    admin = case_dir / "policies"
    admin.mkdir(mode=0o755)
    (admin / "filter.toml").write_text('description = "the site\'s own filter"\n')
    monkeypatch.setattr(policy, "ADMIN_POLICIES", str(admin))
    assert Policy.load("filter").description == "the site's own filter"
    assert Policy.load("strict").name == "strict"  # the shipped one, where the site has none
    admin.chmod(0o775)
    with pytest.raises(compartment.PolicyError, match="policies: writable by its group"):
        Policy.load("filter")


ALLOW_ALL = struct.pack("=HBBI", 0x06, 0, 0, 0x7FFF0000)  # BPF_RET|BPF_K SECCOMP_RET_ALLOW
INET_SOCKET = "import socket; socket.socket(socket.AF_INET); print('made an AF_INET socket')"


def forged_cache(spec: Policy) -> str:
    key = syscall_filter.cache_key(spec.seccomp, spec.network)
    return json.dumps({"key": key, "bpf": ALLOW_ALL.hex(), "names": {}})


def test_an_unprivileged_callers_own_files_never_stand_in_for_the_filter(case_dir: Path) -> None:
    """The agent runs as the unprivileged caller, so a cache the caller could write, an agent
    could forge: a forged program where the caller's cache was must not unfilter the next run."""
    home = mailbox(case_dir / "home", NOBODY)
    filter_policy = Policy.load("filter")
    cache = home / ".cache" / "compartment" / "seccomp"  # where the caller's own used to be
    cache.mkdir(parents=True)
    key = syscall_filter.cache_key(filter_policy.seccomp, filter_policy.network)
    (cache / syscall_filter._cache_name(key)).write_text(forged_cache(filter_policy))
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(home)], check=True)
    done = subprocess.run([sys.executable, "-m", "compartment", "run", "--", PYTHON, "-c",
                           INET_SOCKET], stdin=subprocess.DEVNULL, capture_output=True,
                          user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", check=False,
                          env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 75 and b"made an" not in done.stdout, done.stderr
    assert b"seccomp violation: socket is not allowed" in done.stderr


def test_root_ignores_a_cache_file_that_is_not_roots_alone(case_dir: Path) -> None:
    filter_policy = Policy.load("filter")
    key = syscall_filter.cache_key(filter_policy.seccomp, filter_policy.network)
    path = Path(syscall_filter.CACHE_DIR) / syscall_filter._cache_name(key)
    syscall_filter.compile_filter.cache_clear()
    syscall_filter.compile_filter(filter_policy.seccomp, filter_policy.network)  # made by root
    forged = path.with_name(".forged-" + path.name)
    forged.write_text(forged_cache(filter_policy))
    os.chown(forged, NOBODY, NOBODY)
    forged.rename(path)  # as if uid 65534 had managed to replace it
    try:
        syscall_filter.compile_filter.cache_clear()
        compiled = syscall_filter.compile_filter(filter_policy.seccomp, filter_policy.network)
        assert compiled.bpf != ALLOW_ALL
        assert path.stat().st_uid == 0, "root did not replace the foreign file"
    finally:
        syscall_filter.compile_filter.cache_clear()


@pytest.fixture
def sticky(case_dir: Path) -> Path:
    directory = case_dir / "tmp"
    directory.mkdir()
    directory.chmod(0o1777)
    return directory


def test_the_report_does_not_follow_a_planted_link(case_dir: Path, sticky: Path) -> None:
    precious = case_dir / "root-only"
    precious.write_text("root's\n")
    precious.chmod(0o600)
    os.symlink(precious, sticky / "report.jsonl")
    os.lchown(sticky / "report.jsonl", MAIL_UID, MAIL_UID)
    result = run(["/bin/cat"], Policy.load("filter"), case_dir,
                 report=str(sticky / "report.jsonl"))
    assert (result.outcome, result.exit_status) == (Outcome.OK, 0)
    assert precious.read_text() == "root's\n"
    assert "compartment: report" in (case_dir / "err").read_text()


def test_a_fifo_in_the_reports_place_never_holds_the_answer(case_dir: Path,
                                                            sticky: Path) -> None:
    fifo = sticky / "report.jsonl"
    os.mkfifo(fifo)
    os.chown(fifo, MAIL_UID, MAIL_UID)
    heard: list[bytes] = []

    def listen() -> None:
        with open(fifo, "rb") as pipe:
            heard.append(pipe.read())

    reader = threading.Thread(target=listen, daemon=True)
    for with_reader in (False, True):
        if with_reader:
            reader.start()
            time.sleep(0.1)
        started = time.monotonic()
        result = run(["/bin/cat"], Policy.load("filter"), case_dir, report=str(fifo))
        assert time.monotonic() - started < 10, "the report blocked the delivery's answer"
        assert result.exit_status == 0
        assert "report" in (case_dir / "err").read_text()
    with contextlib.suppress(OSError):  # if the reader still waits for a writer, let it go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    reader.join(5)
    assert heard == [b""]


def test_the_report_is_not_appended_to_a_file_with_another_name(case_dir: Path,
                                                                sticky: Path) -> None:
    precious = case_dir / "root-only"
    precious.write_text("root's\n")
    os.link(precious, sticky / "report.jsonl")
    result = run(["/bin/cat"], Policy.load("filter"), case_dir,
                 report=str(sticky / "report.jsonl"))
    assert result.exit_status == 0 and precious.read_text() == "root's\n"
    assert "other hard links" in (case_dir / "err").read_text()
    assert stat.S_ISREG(os.stat(precious).st_mode)


def test_the_filters_output_does_not_go_through_a_planted_link(case_dir: Path) -> None:
    """Root writes the new message aside and renames it into place: a directory on the way
    that a user swapped for a link to root's own must not receive it."""
    protected = case_dir / "etc"
    protected.mkdir(mode=0o755)
    spool = mailbox(case_dir / "alice", MAIL_UID)
    spool.chmod(0o755)
    os.symlink(protected, spool / "out")
    os.lchown(spool / "out", MAIL_UID, MAIL_UID)
    with open(case_dir / "msg", "wb") as file:
        file.write(MESSAGE)
    with open(case_dir / "msg", "rb") as stdin, open(case_dir / "err", "wb") as err:
        result = compartment.filtering.filter_message(
            ["/bin/cat"], Policy.load("filter", {"identity.uid_pool": HOSTILE_POOL}),
            stdin=stdin.fileno(), output=str(spool / "out" / "message"), stderr=err.fileno())
    assert result.outcome is Outcome.INTERNAL_ERROR and result.exit_status == 75
    assert "is a symbolic link owned by uid 61235" in result.reason
    assert list(protected.iterdir()) == []

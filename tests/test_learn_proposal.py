"""The pure parts of `compartment learn`: the BPF interpreter that answers "would this filter
refuse this call", the learning filter, and the proposal made from evidence (no compartment
runs here: the observations are made up, the host paths are made by the test)."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from compartment import Outcome, Policy, Result, syscalls
from compartment.learn import Sample
from compartment.learn.bpf import BpfError, Program, action
from compartment.learn.document import render
from compartment.learn.evidence import gather
from compartment.learn.listener import WATCHED, Observation
from compartment.learn.proposal import propose
from compartment.policy import _read as read_policy
from compartment.supervisor import describe_root
from compartment.syscall_filter import _compile, compile_learning_filter

ALLOW, NOTIFY, KILL = (syscalls.SECCOMP_RET_ALLOW, syscalls.SECCOMP_RET_USER_NOTIF,
                       0x80000000)
ERRNO = 0x00050000
X86_64, I386 = 0xC000003E, 0x40000003
NR = {"read": 0, "socket": 41, "clone": 56, "fork": 57, "execve": 59, "mount": 165,
      "openat": 257, "clone3": 435}

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64",
                                reason="the syscall numbers below are x86_64's")


def data(name: str, *args: int, arch: int = X86_64) -> bytes:
    """struct seccomp_data for a call, as a notification carries it."""
    return struct.pack("=iIQ6Q", NR[name], arch, 0, *args, *[0] * (6 - len(args)))


def verdict(policy: str, name: str, *args: int, learning: bool = False) -> int:
    loaded = Policy.load(policy)
    compiled = (compile_learning_filter(loaded.seccomp, loaded.network, WATCHED) if learning
                else _compile(loaded.seccomp, loaded.network))
    return action(Program(compiled.bpf).run(data(name, *args)))


# --- the interpreter ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy, call, args, expected", [
    ("filter", "read", (), ALLOW), ("filter", "mount", (), NOTIFY),
    ("filter", "socket", (2,), NOTIFY), ("filter", "socket", (1,), ALLOW),
    ("filter", "clone", (0x11,), ALLOW), ("filter", "clone", (0x10000011,), NOTIFY),
    ("filter", "clone3", (), ERRNO), ("formail", "fork", (), NOTIFY),
    ("formail", "socket", (1,), NOTIFY), ("strict", "openat", (), NOTIFY),
    ("strict", "read", (), ALLOW), ("strict", "execve", (), ALLOW),
])
def test_the_interpreter_answers_as_the_filter_says(policy, call, args, expected):
    assert verdict(policy, call, *args) == expected


def test_another_abi_is_killed_before_any_rule():
    assert verdict("filter", "read") == ALLOW
    program = Program(_compile(Policy.load("filter").seccomp, Policy.load("filter").network).bpf)
    assert action(program.run(data("read", arch=I386))) == KILL


def _program(*instructions: tuple[int, int, int, int]) -> Program:
    return Program(b"".join(struct.pack("=HBBI", *i) for i in instructions))


def test_scratch_memory_arithmetic_and_return_of_a():
    program = _program((0x20, 0, 0, 0),  # A = nr
                       (0x02, 0, 0, 3),  # M[3] = A
                       (0x61, 0, 0, 3),  # X = M[3]
                       (0x04, 0, 0, 10),  # A += 10
                       (0x0C, 0, 0, 0),  # A += X
                       (0x15, 0, 1, 2 * NR["openat"] + 10),  # A == 2 nr + 10 ?
                       (0x16, 0, 0, 0),  # return A
                       (0x06, 0, 0, 0))  # return 0
    assert program.run(data("openat")) == 2 * NR["openat"] + 10
    assert program.run(data("read")) == 0


@pytest.mark.parametrize("instructions, message", [
    (((0x20, 0, 0, 0),), "ran off its end"),
    (((0xC5, 0, 0, 0), (0x06, 0, 0, 0)), "opcode 0xc5"),
    (((0x20, 0, 0, 64), (0x06, 0, 0, 0)), "outside the 64 bytes"),
    (((0x02, 0, 0, 16), (0x06, 0, 0, 0)), "scratch memory word 16"),
])
def test_the_interpreter_refuses_what_seccomp_would(instructions, message):
    with pytest.raises(BpfError, match=message):
        _program(*instructions).run(data("read"))
    with pytest.raises(BpfError, match="not whole instructions"):
        Program(b"\x06\x00\x00")


# --- the learning filter -----------------------------------------------------------------------

@pytest.mark.parametrize("policy, call, args", [
    ("filter", "openat", ()), ("filter", "execve", ()), ("filter", "fork", ()),
    ("filter", "socket", (1,)), ("strict", "execve", ()), ("strict", "clone", (0x11,)),
])
def test_learning_sends_file_process_and_socket_calls_to_the_listener(policy, call, args):
    assert verdict(policy, call, *args) != NOTIFY
    assert verdict(policy, call, *args, learning=True) == NOTIFY


@pytest.mark.parametrize("policy, call, args, expected", [
    ("filter", "read", (), ALLOW), ("filter", "mount", (), NOTIFY),
    ("filter", "clone3", (), ERRNO), ("strict", "read", (), ALLOW),
])
def test_learning_leaves_every_other_rule_as_it_was(policy, call, args, expected):
    assert verdict(policy, call, *args, learning=True) == expected


# --- the proposal ------------------------------------------------------------------------------

@pytest.fixture
def host() -> Iterator[Path]:
    """Host files outside /tmp (a compartment's /tmp is its own): one others may read, one
    they may not, and a directory."""
    path = Path(tempfile.mkdtemp(prefix="learn-proposal-", dir="/var/tmp"))
    (path / "dir").mkdir()
    (path / "public").write_text("x")
    (path / "private").write_text("x")
    for item, mode in (("", 0o755), ("dir", 0o755), ("public", 0o644), ("private", 0o600)):
        os.chmod(path / item, mode)
    yield path
    shutil.rmtree(path)


def sample(name: str = "a.eml", outcome: Outcome = Outcome.OK, size: int = 1000,
           bytes_out: int = 10, **seen: object) -> Sample:
    observation = Observation(name)
    for key, value in seen.items():
        setattr(observation, key, value)
    result = Result(outcome=outcome, exit_status=0, reason=str(outcome), policy="p",
                    program="/usr/bin/true", argv=("/usr/bin/true",), wall_s=0.5, cpu_s=0.2,
                    bytes_out=bytes_out)
    return Sample(name, size, result, b"", observation)


def proposed(base: str, *samples: Sample, overrides: tuple[str, ...] = ()):
    policy = Policy.load(base, overrides)
    _, _, text = read_policy(base)
    plan = describe_root(policy, "/usr/bin/true")
    proposal = propose(tomllib.loads(text), policy, plan, "/usr/bin/true", gather(samples))
    return proposal, render(proposal, ["a test"], "learned in a test")


def changed(proposal, section: str, key: str):
    return proposal.changes[(section, key)].value


def test_hidden_host_paths_are_proposed_read_only_and_the_rest_noted(host: Path):
    paths = {f"{host}/public": ("openat", False), f"{host}/private": ("openat", False),
             f"{host}/dir": ("newfstatat", False), f"{host}/dir/inside": ("openat", False),
             f"{host}/new": ("openat", True), f"{host}/missing/a": ("newfstatat", False),
             "/etc/ld.so.cache": ("openat", False), "/run": ("openat", False),
             "/proc/self/exe": ("readlink", False)}
    proposal, text = proposed("formail", sample(paths=paths))
    assert changed(proposal, "filesystem", "readable") == [f"{host}/dir", f"{host}/public"]
    notes = " ".join(proposal.notes)
    assert f"{host}/private" in notes and "others may not read it" in notes
    assert f"{host}/new" in notes and "never proposes a writable path" in notes
    assert f"{host}/missing/a under {host}, which this host lacks too" in notes
    assert "/run is a whole directory" in notes and "/proc is not the host's" in notes
    assert f"{host}/dir was hidden from the program" in notes
    assert f'"{host}/public",  # added: openat {host}/public (sample a.eml)' in text
    assert Policy.load(_written(text, host)).filesystem.readable == (f"{host}/dir",
                                                                     f"{host}/public")


def test_the_resolver_configuration_is_never_proposed():
    proposal, _ = proposed("formail", sample(paths={"/etc/resolv.conf": ("openat", False)}))
    assert "resolv.conf" not in changed(proposal, "filesystem", "etc")
    if os.path.exists("/etc/resolv.conf"):
        assert any("resolver's configuration" in note for note in proposal.notes)


def test_unused_etc_devices_and_tmp_are_dropped_and_used_ones_kept():
    paths = {"/etc/passwd": ("openat", False), "/dev/urandom": ("openat", False),
             "/etc/ld.so.cache": ("openat", False)}
    proposal, text = proposed("filter", sample(paths=paths))
    assert changed(proposal, "filesystem", "etc") == ["ld.so.cache", "passwd"]
    assert changed(proposal, "filesystem", "devices") == ["urandom"]
    assert changed(proposal, "filesystem", "tmp_bytes") == 0
    assert "# learned: group, nsswitch.conf, localtime, mime.types opened by no sample" in text
    used = proposed("filter", sample(paths={"/tmp/scratch": ("openat", True)}))[0]
    assert ("filesystem", "tmp_bytes") not in used.changes


def test_a_tmp_the_root_lacked_is_proposed():
    proposal, _ = proposed("formail", sample(paths={"/tmp/x": ("openat", True)}))
    assert changed(proposal, "filesystem", "tmp_bytes") == "16M"


def test_calls_the_base_refuses_leave_deny_and_unused_process_calls_join_it():
    used = sample(refused={"clone": "clone(flags 0x11)"},
                  calls=Counter({"clone": 2, "execve": 3}), peak_processes=3)
    proposal, _ = proposed("formail", used)
    assert changed(proposal, "seccomp", "deny") == ["fork", "vfork", "execveat"]
    assert changed(proposal, "limits", "processes") == 6
    quiet, text = proposed("filter", sample())
    assert changed(quiet, "seccomp", "deny") == ["fork", "vfork", "clone", "execveat"]
    assert changed(quiet, "limits", "processes") == 0
    assert '"fork",  # added: no sample started a process or thread' in text


def test_links_are_denied_only_with_a_writable_directory_and_when_unused(host: Path):
    overrides = (f"filesystem.writable={host}/dir",)
    proposal, _ = proposed("deliver", sample(calls=Counter({"link": 1})), overrides=overrides)
    deny = changed(proposal, "seccomp", "deny")
    assert {"linkat", "symlink", "symlinkat"} <= set(deny) and "link" not in deny
    assert "link" not in " ".join(changed(proposed("filter", sample())[0], "seccomp", "deny"))


def test_an_allow_list_grows_by_the_calls_made_and_sockets_go_to_network():
    made = sample(refused={"openat": "openat", "socket": "socket(AF_UNIX)"},
                  sockets={"socket(AF_UNIX)": "socket"})
    proposal, _ = proposed("strict", made)
    assert changed(proposal, "seccomp", "allow") == ["openat"]
    assert changed(proposal, "network", "unix_sockets") is True
    assert any("allow-list holds only the calls" in note for note in proposal.notes)


def test_limits_get_headroom_and_floors():
    big = sample(peak_vm_bytes=300 << 20, descriptors=40, bytes_out=3 << 20, size=100 << 20)
    proposal, _ = proposed("filter", big, sample("b.eml", bytes_out=10))
    assert changed(proposal, "limits", "memory_bytes") == "600M"
    assert changed(proposal, "limits", "open_files") == 128
    assert changed(proposal, "limits", "output_bytes") == "6M"
    assert changed(proposal, "limits", "cpu_seconds") == 10  # 4 x 0.2 s is under the floor
    assert changed(proposal, "limits", "wall_timeout_s") == 60
    assert changed(proposal, "limits", "file_bytes") == 0  # nothing written


def test_a_program_that_writes_the_message_back_keeps_the_output_bound():
    proposal, _ = proposed("filter", sample(size=1000, bytes_out=1000))
    assert ("limits", "output_bytes") not in proposal.changes
    assert any("writes the message back" in note for note in proposal.notes)


def test_limits_stay_the_bases_when_a_sample_did_not_end_ok():
    failed = sample(outcome=Outcome.AGENT_FAILED, peak_vm_bytes=1 << 20)
    proposal, _ = proposed("filter", failed)
    assert not {key for section, key in proposal.changes if section == "limits"} - {"processes"}
    notes = " ".join(proposal.notes)
    assert "not every sample ended ok" in notes and "ended with agent-failed" in notes


def test_baseline_tries_are_noted_once_per_sample():
    tried = sample(walls={"mount": "mount", "socket(AF_INET)": "socket"})
    proposal, _ = proposed("filter", tried)
    [note] = [note for note in proposal.notes if "no policy allows these" in note]
    assert note.startswith("mount, socket(AF_INET) (sample a.eml)")


def test_several_samples_give_the_union_with_the_first_sample_named(host: Path):
    first = sample("one.eml", paths={f"{host}/public": ("openat", False)})
    second = sample("two.eml", paths={f"{host}/dir": ("openat", False),
                                      f"{host}/public": ("openat", False)})
    proposal, text = proposed("formail", first, second)
    assert changed(proposal, "filesystem", "readable") == [f"{host}/dir", f"{host}/public"]
    assert f"{host}/public (sample one.eml)" in text and f"{host}/dir (sample two.eml)" in text


def test_a_path_cannot_write_keys_through_a_comment(host: Path):
    """Paths come from the agent's memory: a newline in one must not end a comment line."""
    evil = f"{host}/x\n[seccomp]\ndefault = \"allow\"\n#"
    proposal, text = proposed("strict", sample(paths={evil: ("openat", True)}))
    assert "\\n[seccomp]\\ndefault" in text
    loaded = Policy.load(_written(text, host))
    assert loaded.seccomp.default == "kill" and "\n[seccomp]" not in text.split("Not learned")[1]


def _written(text: str, directory: Path) -> str:
    path = directory / "learned.toml"
    path.write_text(text)
    return str(path)

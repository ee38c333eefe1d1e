"""Policy loading: every shipped policy is valid, and one test per error message."""

from __future__ import annotations

import pytest

from compartment import Policy, PolicyError
from compartment.policy import shipped
from compartment.syscall_filter import FilterError, compile_filter


def load_text(tmp_path, text, overrides=()):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return Policy.load(str(path), overrides)


@pytest.mark.parametrize("name", ["strict", "filter", "deliver"])
def test_shipped_policies_load_and_compile(name):
    policy = Policy.load(name, ["filesystem.writable=/srv/mail"] if name == "deliver" else [])
    assert policy.name == name and policy.description
    assert len(compile_filter(policy.seccomp, policy.network).bpf) % 8 == 0


def test_shipped_list_names_the_three():
    assert {"strict", "filter", "deliver"} <= set(shipped())


def test_units_and_overrides(tmp_path):
    policy = load_text(tmp_path, '[limits]\nmemory_bytes = "512M"\nwall_timeout_s = "2m"\n'
                       'file_bytes = "1 GiB"\n', {"limits.cpu_seconds": "9",
                                                  "filesystem.writable": "/srv/a,/srv/b",
                                                  "environment.set.FOO": "bar"})
    assert policy.limits.memory_bytes == 512 << 20 and policy.limits.wall_timeout_s == 120
    assert policy.limits.file_bytes == 1 << 30 and policy.limits.cpu_seconds == 9
    assert policy.filesystem.writable == ("/srv/a", "/srv/b")
    assert ("FOO", "bar") in policy.environment.set


def test_to_toml_round_trips(tmp_path):
    policy = Policy.load("deliver", ["filesystem.writable=/srv/mail"])
    text = policy.to_toml()
    again = load_text(tmp_path, text.split("\n", 1)[1])
    assert again.filesystem == policy.filesystem and again.limits == policy.limits
    assert again.seccomp == policy.seccomp and again.environment == policy.environment


ERRORS = [
    ("[limits\n", "not valid TOML"),
    ('bogus = 1\n', "unknown key 'bogus'"),
    ("description = 3\n", "description: expected a string"),
    ("limits = 3\n", "[limits]: expected a table"),
    ("[limits]\ncpu = 3\n", "limits.cpu: unknown key (expected one of wall_timeout_s"),
    ('[limits]\nmemory_bytes = "lots"\n', "limits.memory_bytes: expected a byte count"),
    ("[limits]\nmemory_bytes = -1\n", "limits.memory_bytes: expected a byte count"),
    ('[limits]\nwall_timeout_s = "soon"\n', "limits.wall_timeout_s: expected a positive duration"),
    ("[limits]\nwall_timeout_s = 0\n", "limits.wall_timeout_s: expected a positive duration"),
    ("[limits]\ncpu_seconds = true\n", "limits.cpu_seconds: expected a whole number"),
    ('[filesystem]\nproc = "yes"\n', "filesystem.proc: expected true or false"),
    ("[report]\npath = 1\n", "report.path: expected a string"),
    ('[filesystem]\nroot = "host"\n', 'filesystem.root: expected one of "system", "empty"'),
    ('[filesystem]\nwritable = 3\n', "filesystem.writable: expected a list of absolute paths"),
    ('[filesystem]\nwritable = ["Maildir"]\n', "filesystem.writable: expected absolute paths"),
    ('[filesystem]\nwritable = ["/srv/../etc"]\n', 'expected absolute paths without ".."'),
    ('[filesystem]\netc = ["/etc/shadow"]\n', "filesystem.etc: expected names under /etc"),
    ('[seccomp]\ndeny = ["Ptrace!"]\n', "seccomp.deny: expected syscall names"),
    ('[environment]\npass = ["1X"]\n', "environment.pass: expected environment variable names"),
    ("[descriptors]\npass = [1]\n", "descriptors.pass: expected descriptor numbers from 3"),
    ('[environment]\nset = ["A"]\n', "environment.set: expected a table of NAME"),
    ('[environment]\nset = { "A B" = "x" }\n', "environment.set: expected a table of NAME"),
    ("[identity]\nuid = 0\n", 'identity.uid: expected "pool", "owner" or a numeric id'),
    ('[identity]\nuid_pool = "0-10"\n', "identity.uid_pool: expected a range of non-zero ids"),
    ('[identity]\nuid_pool = "20-10"\n', "identity.uid_pool: expected a range of non-zero ids"),
    ('[filesystem]\nroot = "empty"\netc = ["passwd"]\n', 'an "empty" root shows no /etc files'),
    ('[seccomp]\nallow = ["read"]\n', 'seccomp.allow: only meaningful with seccomp.default'),
    ('[seccomp]\ndefault = "kill"\nallow = ["read"]\ndeny = ["read"]\n',
     "'read' is both allowed and denied"),
    ('[identity]\nuid = "owner"\n', '"owner" needs a filesystem.writable directory'),
    ("[identity]\nuid = 1000\n", "a numeric uid needs a numeric gid"),
    ('[filesystem]\nreadable = ["/srv"]\nwritable = ["/srv"]\n', "/srv is both readable and"),
]


@pytest.mark.parametrize("text, message", ERRORS, ids=[m for _, m in ERRORS])
def test_error_names_file_key_and_form(tmp_path, text, message):
    with pytest.raises(PolicyError) as caught:
        load_text(tmp_path, text)
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "p.toml"))


@pytest.mark.parametrize("source, overrides, message", [
    ("/nonexistent/policy.toml", (), "cannot read policy"),
    ("no-such-policy", (), "no policy named 'no-such-policy'"),
    ("Bad Name!", (), "not a policy name or a path"),
    ("filter", ["limits.cpu_seconds"], "expected KEY=VALUE"),
    ("filter", ["cpu_seconds=3"], "expected SECTION.KEY"),
    ("filter", ["limits.cpu_seconds=-3"], "limits.cpu_seconds: expected a whole number"),
])
def test_load_and_override_errors(source, overrides, message):
    with pytest.raises(PolicyError, match=message.replace("(", r"\(")):
        Policy.load(source, overrides)


def test_override_into_a_non_table(tmp_path):
    with pytest.raises(PolicyError, match=r"limits in the policy is not a table"):
        load_text(tmp_path, "limits = 3\n", ["limits.cpu_seconds=3"])
    with pytest.raises(PolicyError, match=r"environment.set in the policy is not a table"):
        load_text(tmp_path, "[environment]\nset = 5\n", ["environment.set.X=1"])
    with pytest.raises(PolicyError, match=r"environment in the policy is not a table"):
        load_text(tmp_path, "environment = 5\n", ["environment.set.X=1"])
    with pytest.raises(PolicyError, match=r"environment.set in the policy is not a table"):
        Policy.load("filter", ["environment.set=", "environment.set.PATH="])


@pytest.mark.parametrize("overrides, message", [
    ({"seccomp.deny": "@nonsense"}, "unknown group '@nonsense'"),
    ({"seccomp.deny": "no_such_syscall"}, "cannot filter 'no_such_syscall'"),
    ({"seccomp.default": "kill", "seccomp.allow": "ptrace"}, "'ptrace' is in the built-in"),
    # allowed by name, socket() would take every family, AF_INET included
    ({"seccomp.default": "kill", "seccomp.allow": "socket"}, "'socket' is granted by network"),
])
def test_filter_errors(overrides, message):
    policy = Policy.load("filter", overrides)
    with pytest.raises(FilterError, match=message):
        compile_filter(policy.seccomp, policy.network)


# docs/policy.md against the field metadata: tests/test_manpages.py

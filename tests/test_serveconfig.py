"""The resident supervisor's configuration: one test per error message, the trust rule for
the file, `compartment check --serve`, and what a rule grants."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compartment import serveconfig
from compartment.serveconfig import ConfigError, parse

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the configuration is root's (the "
                                "trust checks need files owned by root and by another uid)")


def rule(**keys):
    return {"allow": [{"user": 64010, **keys}]}


ERRORS = [
    ({"allowed": []}, "unknown key 'allowed'"),
    ({"socket": {"mode": "0666"}}, r"\[socket\]: expected a table with only group"),
    ({"socket": {"group": "no-such-group-here"}}, "no group named"),
    ({"allow": {"user": 1}}, r"allow: expected \[\[allow\]\] tables"),
    (rule(users=["x"]), "allow\\[1\\]: unknown key 'users'"),
    ({"allow": [{"policies": []}]}, "give exactly one of user or group"),
    ({"allow": [{"user": 1, "group": 1}]}, "give exactly one of user or group"),
    ({"allow": [{"user": 0}]}, "root may always connect"),
    ({"allow": [{"user": "no-such-user-here"}]}, "no user named"),
    ({"allow": [{"user": 1.5}]}, "expected a user name or a uid"),
    ({"allow": [{"group": True}]}, "expected a group name or a gid"),
    (rule(policies="filter"), "policies: expected a list of strings"),
    (rule(policies=["/etc/x.toml"]), "is not a policy name"),
    (rule(set=["identity.uid"]), "'identity.uid' cannot be granted"),
    (rule(set=["environment.set.1X"]), "cannot be granted"),
    (rule(deliver_as_owner=["home/*/Maildir"]), "expected an absolute path pattern"),
    (rule(deliver_as_owner=["/home/../root"]), "expected an absolute path pattern"),
    (rule(max_live=0), "max_live: expected a whole number from 1 to 4096"),
    (rule(max_live=True), "max_live: expected a whole number"),
    (rule(status="yes"), "status: expected true or false"),
]


@pytest.mark.parametrize(("document", "message"), ERRORS)
def test_each_error_names_the_file_the_rule_and_the_key(document, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse("/etc/compartment/serve.toml", document)
    assert str(caught.value).startswith("/etc/compartment/serve.toml")


def test_the_first_matching_rule_applies_and_root_needs_none():
    config = parse("x", {"allow": [{"user": 64010, "policies": ["deliver"]},
                                   {"group": 64100, "policies": ["filter"]},
                                   {"user": 64011, "policies": ["strict"]}]})
    assert config.rule_for(64010, (64100,)).policies == ("deliver",)
    assert config.rule_for(64011, (64100,)).policies == ("filter",)  # its group came first
    assert config.rule_for(64012, (64012,)) is None
    assert config.rule_for(0, (0,)).policies == ("*",)
    assert config.socket_mode() == 0o666
    assert parse("x", {}).socket_mode() == 0o600  # root only


def test_grants_of_set_keys():
    granted = parse("x", rule(set=["limits.cpu_seconds", "environment.set.*"])).rules[0]
    assert granted.allows_set("limits.cpu_seconds") and granted.allows_set("environment.set.X")
    assert not granted.allows_set("limits.memory_bytes")
    one = parse("x", rule(set=["environment.set.SENDER"])).rules[0]
    assert one.allows_set("environment.set.SENDER") and not one.allows_set("environment.set.X")


def write(path, text, mode=0o644, uid=0):
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, uid, 0)
    return path


def test_a_missing_file_means_root_only(tmp_path):
    config = serveconfig.load(str(tmp_path / "none.toml"))
    assert config.rules == () and "only root" in config.source


@pytest.mark.parametrize(("mode", "uid", "message"), [
    (0o664, 0, "mode 0664"), (0o646, 0, "mode 0646"), (0o644, 64010, "owned by uid 64010")])
def test_a_file_others_could_change_is_refused(tmp_path, mode, uid, message):
    path = write(tmp_path / "serve.toml", "", mode, uid)
    with pytest.raises(ConfigError, match=message):
        serveconfig.load(str(path))


def test_a_directory_others_could_change_is_refused(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir()
    path = write(directory / "serve.toml", "")
    directory.chmod(0o777)
    with pytest.raises(ConfigError, match="mode 0777"):
        serveconfig.load(str(path))
    directory.chmod(0o1777)  # sticky, and the file is root's: as /tmp
    assert serveconfig.load(str(path)).rules == ()


def test_a_link_is_followed_only_when_root_made_it(tmp_path):
    target = write(tmp_path / "real.toml", "[[allow]]\nuser = 64010\n")
    link = tmp_path / "serve.toml"
    link.symlink_to(target)
    assert serveconfig.load(str(link)).rules  # root's own link, as /etc's are
    os.lchown(link, 64010, 64010)
    with pytest.raises(ConfigError, match="64010"):
        serveconfig.load(str(link))


def test_check_serve_prints_the_configuration_resolved(tmp_path):
    path = write(tmp_path / "serve.toml", '[[allow]]\nuser = "nobody"\npolicies = ["deliver"]\n'
                 'set = ["limits.cpu_seconds"]\n')
    done = subprocess.run([sys.executable, "-m", "compartment", "check", "--serve", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert 'user = "nobody"  # uid 65534' in done.stdout and "max_live = 8" in done.stdout
    bad = write(tmp_path / "bad.toml", '[[allow]]\nuser = "nobody"\npolicies = ["nonesuch"]\n')
    done = subprocess.run([sys.executable, "-m", "compartment", "check", "--serve", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78 and "no policy named 'nonesuch'" in done.stderr

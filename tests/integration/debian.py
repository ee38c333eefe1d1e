"""Debian package handling for the MTA fixtures: install one MTA, removing a conflicting one.

Postfix and Exim both provide `mail-transport-agent` and conflict with each other, so a fixture
swaps them in one apt transaction (install the wanted MTA and remove the other at once, so
packages depending on "some MTA" are not removed along the way).  The Debian questions are
preseeded so that nothing is asked and neither package writes a configuration the tests rely on.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
# Other sessions may hold the dpkg lock for a moment (installing filters): wait, don't fail.
APT_OPTIONS = ["-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
               "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
APT_TIMEOUT_S = 600


def require_root_debian() -> None:
    """Skip, with a reason, where the fixture cannot install and run an MTA."""
    if os.geteuid() != 0:
        pytest.skip("real-MTA tests install Debian packages and start an MTA: run them as root")
    if not shutil.which("apt-get") or not shutil.which("dpkg-query"):
        pytest.skip("real-MTA tests need a Debian system (apt-get, dpkg-query)")


def installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                            capture_output=True, text=True, check=False)
    return result.returncode == 0 and result.stdout.strip() == "install ok installed"


def _apt_install(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["apt-get", "install", *APT_OPTIONS, *args], env=APT_ENV,
                          capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False)


def install_replacing(wanted: list[str], conflicting: list[str], preseed: str) -> None:
    """Install `wanted`, purging whichever of `conflicting` is installed, answering `preseed`.

    Cached after the first time: when everything wanted is there and nothing conflicting is,
    nothing runs.
    """
    to_remove = [p for p in conflicting if installed(p)]
    if all(installed(p) for p in wanted) and not to_remove:
        return
    subprocess.run(["debconf-set-selections"], input=preseed, text=True, check=True)
    args = ["--purge", *wanted, *(f"{p}-" for p in to_remove)]
    result = _apt_install(args)
    if result.returncode != 0:
        # A fresh machine has no package lists yet; fetch them once and try again.
        subprocess.run(["apt-get", "update", "-q"], env=APT_ENV, capture_output=True,
                       timeout=APT_TIMEOUT_S, check=False)
        result = _apt_install(args)
    if result.returncode != 0:
        pytest.fail(f"apt-get install {' '.join(args)} failed:\n{result.stdout[-2000:]}"
                    f"\n{result.stderr[-2000:]}")
    missing = [p for p in wanted if not installed(p)]
    assert not missing, f"apt-get reported success but {missing} are not installed"

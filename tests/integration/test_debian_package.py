"""`make deb`, then `apt install ./compartment_*.deb` on a fresh Debian 12, then purge.

The fresh system is a minbase root made by debootstrap from the Debian mirror this machine's
apt uses (kept as a tarball under CACHE after the first run, and unpacked anew for each run;
downloaded packages are kept too).  Every command runs chrooted into it inside a mount
namespace of its own (unshare), with its own /proc, /dev, /sys, /run and /tmp, so nothing of
the host's state (the uid leases under /run/compartment, the seccomp cache) is seen or
touched, and nothing is left mounted; the host's cgroup hierarchies are bound in, as a real
system has them (a root run needs a cgroup of its own below its own).  The root is
bind-mounted on itself, so that it is a mount point and compartment's pivot_root works inside
it, as it would on a real system.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .debian import APT_ENV, require_root_debian

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/compartment-test")
SUITE = "bookworm"
BASE = CACHE / f"debootstrap-{SUITE}.tar"
ARCHIVES = CACHE / "apt-archives"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
TIMEOUT_S = 900

# In the new root, what the package's users run; and the filter of every shipped policy,
# compiled through Debian's python3-seccomp, to compare with the one pip's pyseccomp compiles.
FILTERS = """\
import hashlib
from compartment.policy import Policy, shipped
from compartment.syscall_filter import _compile
for name in shipped():
    policy = Policy.load(name, {"filesystem.writable": "/tmp"})
    print(name, hashlib.sha256(_compile(policy.seccomp, policy.network).bpf).hexdigest())
"""


def mirror() -> str:
    """The Debian mirror of this machine's apt sources for SUITE (one-line or deb822)."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        text = path.read_text() if path.is_file() else ""
        for match in re.finditer(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.M):
            return match[1]
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and SUITE in suites[1].split():
                return uris[1]
    return DEFAULT_MIRROR


def _base_tarball() -> Path:
    if BASE.exists():
        return BASE
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap is not installed (.ci/run installs it)")
    CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        root = Path(work, "root")
        subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(root), mirror()],
                       check=True, capture_output=True, timeout=TIMEOUT_S)
        partial = BASE.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True,
                       timeout=TIMEOUT_S)
        partial.rename(BASE)  # whole or absent
    return BASE


def in_root(root: Path, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a shell command chrooted into root, in a mount namespace of its own."""
    setup = (f'set -e; r="{root}"; mount --bind "$r" "$r"; mount -t proc proc "$r/proc"; '
             'mount --rbind /dev "$r/dev"; mount -t sysfs sysfs "$r/sys"; '
             # the host's cgroups, as a real system has them: root's runs need one
             'mount --rbind /sys/fs/cgroup "$r/sys/fs/cgroup"; '
             'mount -t tmpfs tmpfs "$r/run"; mount -t tmpfs tmpfs "$r/tmp"; '
             f'mount --bind "{ARCHIVES}" "$r/var/cache/apt/archives"; '
             'exec chroot "$r" /bin/sh -c "$1"')
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "--fork",
                             "/bin/sh", "-c", setup, "in_root", command],
                            capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**APT_ENV, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                            check=False)
    if check and result.returncode != 0:
        pytest.fail(f"in the new root, `{command}` exited {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    """A fresh Debian 12 with the package built from this tree installed by apt."""
    require_root_debian()
    tarball = _base_tarball()
    ARCHIVES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compartment-deb-", dir="/var/tmp") as work:
        built = subprocess.run(["make", "-s", "deb", f"DEBDIR={work}"], cwd=REPO,
                               capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        [deb] = Path(work).glob("compartment_*_all.deb")
        new_root = Path(work, "root")
        new_root.mkdir()
        subprocess.run(["tar", "-C", str(new_root), "-xf", str(tarball)], check=True,
                       timeout=TIMEOUT_S)
        shutil.copy(deb, new_root / "root" / deb.name)
        in_root(new_root, "apt-get update -q")
        # As an administrator would: apt install ./compartment_VERSION_all.deb
        in_root(new_root, f"cd /root && apt-get install -y -q --no-install-recommends "
                f"./{deb.name}")
        yield new_root


def test_compartment_runs_from_path(root):
    done = in_root(root, "command -v compartment; echo through the package | "
                   "compartment run -p filter -- /bin/cat")
    assert done.stdout == "/usr/bin/compartment\nthrough the package\n", done.stderr


def test_shipped_policies_and_man_pages(root):
    listed = in_root(root, "compartment policies").stdout.split("\n")
    assert {line.split()[0] for line in listed if line} >= {"strict", "filter", "deliver"}
    for page in ("man1/compartment.1.gz", "man5/compartment-policy.5.gz"):
        assert (root / "usr/share/man" / page).is_file(), page
    assert (root / "usr/libexec/compartment/maildir-deliver.py").stat().st_mode & 0o111


def test_the_resident_supervisors_units_are_installed_and_the_socket_enabled(root):
    units = root / "lib/systemd/system"
    service = (units / "compartment.service").read_text()
    assert "ExecStart=/usr/bin/compartment serve " in service and "/usr/local" not in service
    assert (units / "compartment.socket").is_file()
    enabled = root / "etc/systemd/system/sockets.target.wants/compartment.socket"
    assert enabled.is_symlink(), "deb-systemd-helper did not enable compartment.socket"
    assert (root / "usr/share/man/man8/compartment-serve.8.gz").is_file()


def test_etc_and_the_fronts_users(root):
    done = in_root(root, "stat -c '%U:%G %a' /etc/compartment /etc/compartment/policies; "
                   "getent passwd compartment-lmtp compartment-milter; getent group compartment")
    lines = done.stdout.splitlines()
    assert lines[:2] == ["root:root 755", "root:root 755"]
    for line, front in zip(lines[2:4], ("compartment-lmtp", "compartment-milter"), strict=True):
        assert line.startswith(f"{front}:x:") and line.endswith(":/usr/sbin/nologin"), line
    # the supervisor's socket group when the fronts are its clients: the fronts and no one else
    assert lines[4].startswith("compartment:x:")
    assert sorted(lines[4].split(":")[3].split(",")) == ["compartment-lmtp", "compartment-milter"]


def test_the_fronts_units_are_installed_not_enabled(root):
    units = root / "lib/systemd/system"
    for front in ("compartment-lmtp", "compartment-milter"):
        service = (units / f"{front}.service").read_text()
        assert f"User={front}" in service and "ExecStart=/usr/bin/compartment " in service
        assert "/usr/local" not in service + (units / f"{front}.socket").read_text()
        assert not (root / "etc/systemd/system/sockets.target.wants" / f"{front}.socket").exists()


def test_debian_seccomp_bindings_compile_the_same_filters(root):
    """The package uses python3-seccomp (libseccomp's bindings), pip installs pyseccomp:
    every shipped policy must compile to the same BPF program with both."""
    from compartment.policy import Policy, shipped
    from compartment.syscall_filter import _compile

    here = {}
    for name in shipped():
        policy = Policy.load(name, {"filesystem.writable": "/tmp"})
        here[name] = hashlib.sha256(_compile(policy.seccomp, policy.network).bpf).hexdigest()
    script = root / "tmp-filters.py"
    script.write_text(FILTERS)
    done = in_root(root, "python3 -I /tmp-filters.py")
    there = dict(line.split() for line in done.stdout.splitlines())
    assert there == here


def test_purge_removes_what_the_package_made(root):
    in_root(root, "compartment check -p filter >/dev/null")  # a run leaves its cache
    assert (root / "var/cache/compartment").is_dir()
    in_root(root, "apt-get purge -y -q compartment")
    for path in ("usr/bin/compartment", "etc/compartment", "usr/libexec/compartment",
                 "var/cache/compartment", "usr/lib/python3/dist-packages/compartment",
                 "lib/systemd/system/compartment.socket",
                 "lib/systemd/system/compartment-lmtp.service",
                 "etc/systemd/system/sockets.target.wants/compartment.socket"):
        assert not (root / path).exists(), path
    left = in_root(root, "getent passwd compartment-lmtp compartment-milter; "
                   "getent group compartment compartment-lmtp compartment-milter", check=False)
    assert left.stdout == ""

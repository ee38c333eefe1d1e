#!/usr/bin/env python3
"""Run compartment's cgroup tests on cgroup v2 with its controllers, in a VM with Debian 12's
kernel: the layout most users have, which the project's own machines (memory, pids and cpuacct
on cgroup v1) cannot show.

    sudo .venv/bin/python tests/vm/cgroup_v2.py [PYTEST ARGS...]

Needs root, qemu-system-x86 and `apt-get download` (it fetches Debian's generic kernel and
busybox-static into ~/.cache/compartment-vm, once).  The CPU is emulated (TCG, one CPU: slow,
but it runs where nested KVM does not, as on this project's machines); COMPARTMENT_VM_ACCEL=kvm
uses KVM instead.  The VM boots that kernel with an
initramfs of busybox and the modules for 9p and ext4; its root is this machine's / over 9p,
read-only, with tmpfs on /tmp, /run and /var/cache/compartment and a scratch ext4 disk on
/var/tmp (the page-cache test needs a disk); cgroup2 is mounted alone at /sys/fs/cgroup, every
controller on it, and the tests run as root in the root cgroup, as on a host without systemd.
Then `compartment check`, and section 9 of the bench (what a cgroup adds per delivery).
Exit status: pytest's, 2 when the VM cannot run here.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_PACKAGE = "linux-image-6.1.0-47-amd64"  # Debian 12's generic kernel (has 9p)
CACHE = Path.home() / ".cache" / "compartment-vm"
TREE = Path(__file__).resolve().parents[2]
MODULES = ("9p", "9pnet_virtio", "virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
TESTS = ("tests/test_cgroups.py", "tests/test_cgroups_v2.py")
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for module in $(cat /modules.order); do insmod "/modules/$module"; done
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /host
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t devtmpfs dev /host/dev
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
mkdir -p /host/dev/shm
for dir in /tmp /run /var/cache/compartment /dev/shm; do mount -t tmpfs tmpfs "/host$dir"; done
mount -t ext4 /dev/vda /host/var/tmp
chroot /host /bin/sh -c 'cd {tree} && export PYTHONDONTWRITEBYTECODE=1 TMPDIR=/var/tmp;
  uname -r; grep -v "^0::/$" /proc/self/cgroup; cat /sys/fs/cgroup/cgroup.controllers
  .venv/bin/python -m pytest -p no:cacheprovider -q -rs -s {tests}; status=$?
  .venv/bin/python -m compartment check | grep "limits enforced"
  .venv/bin/python bench/bench.py --quick --only 9 | sed -n "/== 9/,/bench took/p"
  echo "VM-EXIT=$status"'
poweroff -f
"""


def main() -> int:
    if os.geteuid() != 0 or not shutil.which("qemu-system-x86_64"):
        print("cgroup_v2: needs root and qemu-system-x86", file=sys.stderr)
        return 2
    kernel_tree = _unpacked(KERNEL_PACKAGE)
    busybox = _unpacked("busybox-static") / "bin" / "busybox"
    with tempfile.TemporaryDirectory(prefix="compartment-vm-") as scratch:
        work = Path(scratch)
        initrd = _initramfs(work, kernel_tree, busybox, [*TESTS, *sys.argv[1:]])
        disk = work / "scratch.img"
        with open(disk, "wb") as image:
            image.truncate(4 << 30)
        subprocess.run(["mkfs.ext4", "-q", str(disk)], check=True)
        kernel = next(kernel_tree.glob("boot/vmlinuz-*"))
        return _boot(kernel, initrd, disk)


def _unpacked(package: str) -> Path:
    """The package's files under CACHE/package, fetched and unpacked once."""
    target = CACHE / package
    if not target.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", package], cwd=CACHE, check=True)
        deb = max(glob.glob(str(CACHE / f"{package}_*.deb")))
        subprocess.run(["dpkg-deb", "-x", deb, str(target)], check=True)
    return target


def _initramfs(work: Path, kernel_tree: Path, busybox: Path, tests: list[str]) -> Path:
    root = work / "initramfs"
    (root / "bin").mkdir(parents=True)
    (root / "modules").mkdir()
    for name in ("proc", "sys", "dev"):
        (root / name).mkdir()
    shutil.copy(busybox, root / "bin" / "busybox")
    order = []
    for path in _with_dependencies(kernel_tree, MODULES):
        shutil.copy(path, root / "modules" / path.name)
        order.append(path.name)
    (root / "modules.order").write_text("\n".join(order) + "\n")
    init = root / "init"
    init.write_text(INIT.format(tree=TREE, tests=shlex.join(tests).replace("'", "'\\''")))
    init.chmod(0o755)
    listing = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    archive = work / "initrd.cpio"
    with open(archive, "wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=listing,
                       stdout=out, check=True)
    return archive


def _with_dependencies(kernel_tree: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The modules' files, each after those it depends on (read from its .modinfo)."""
    found = {p.name[:-3].replace("-", "_"): p for p in kernel_tree.glob("lib/modules/*/**/*.ko")}
    ordered: list[Path] = []

    def add(name: str) -> None:
        path = found[name.replace("-", "_")]
        if path in ordered:
            return
        data = path.read_bytes()
        start = data.find(b"\0depends=") + len(b"\0depends=")
        for dependency in data[start:data.index(b"\0", start)].decode().split(","):
            if dependency:
                add(dependency)
        ordered.append(path)

    for name in wanted:
        add(name)
    return ordered


def _boot(kernel: Path, initrd: Path, disk: Path) -> int:
    accel = os.environ.get("COMPARTMENT_VM_ACCEL", "tcg")
    command = ["qemu-system-x86_64", "-accel", accel, "-smp", "1", "-m", "3072",
               "-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
               "-append", "console=ttyS0 quiet loglevel=3 panic=-1",
               "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,"
                          "multidevs=remap,readonly=on",
               "-drive", f"file={disk},format=raw,if=virtio"]
    status = 1
    with subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          text=True, errors="replace") as vm:
        for line in vm.stdout:
            print(line, end="", flush=True)
            if line.startswith("VM-EXIT="):
                status = int(line.split("=")[1])
    return status


if __name__ == "__main__":
    sys.exit(main())

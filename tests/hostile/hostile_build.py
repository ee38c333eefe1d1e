"""Building the hostile agents: every agents/*.c into a static, non-PIE binary.

Test side, root, before any case runs.  Static so that the `strict` policy's empty root can run
them; non-PIE so that the i386 agent's pointers fit in 32 bits.  The setuid probe is installed
setuid root in its own directory, for the case that execs it from inside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

AGENTS = Path(__file__).parent / "agents"
CFLAGS = ["-O1", "-Wall", "-Wextra", "-Werror", "-static", "-no-pie", "-pthread"]


class BuildError(Exception):
    """The agents could not be built; the message carries the compiler's output."""


def compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def build(bin_dir: Path) -> None:
    """Compile every agent into bin_dir (mode 0755, so any agent uid can run them)."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (gcc) found")
    bin_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(bin_dir, 0o755)
    sources = sorted(AGENTS.glob("*.c"))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [f for f in pool.map(lambda s: _compile(cc, s, bin_dir), sources) if f]
    if failures:
        raise BuildError("\n".join(failures))
    suid_dir = bin_dir / "suid"
    suid_dir.mkdir(exist_ok=True)
    os.chmod(suid_dir, 0o755)
    probe = suid_dir / "suid_probe"
    shutil.copy(bin_dir / "suid_probe", probe)
    os.chown(probe, 0, 0)
    os.chmod(probe, 0o4755)


def _compile(cc: str, source: Path, bin_dir: Path) -> str:
    target = bin_dir / source.stem
    done = subprocess.run([cc, *CFLAGS, "-o", str(target), str(source)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"{source.name}: {done.stderr.strip()}"
    os.chmod(target, 0o755)
    return ""

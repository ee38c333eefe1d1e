"""Fixtures for the hostile tests: the agents built once per session in a directory every agent
uid may read, and a fresh outside directory per case."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hostile_build import BuildError, build, compiler  # noqa: E402
from hostile_evidence import NOBODY, remove_tree  # noqa: E402


def hostile_skip_reason() -> str | None:
    """Why the hostile tests cannot run here, in words a user would accept; None if they can."""
    if os.geteuid() != 0:
        return "hostile tests need root (uid pool, canaries of other uids, setuid probe)"
    if compiler() is None:
        return "hostile agents are C programs and no C compiler (gcc) is installed"
    try:
        import compartment  # noqa: F401
    except ImportError as err:
        return f"the compartment package is not importable: {err}"
    return None


@pytest.fixture(scope="session")
def hostile_root() -> Iterator[Path]:
    reason = hostile_skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    os.chmod(root, 0o755)   # agents of any uid traverse it to reach bin/
    try:
        yield root
    finally:
        remove_tree(root)


@pytest.fixture(scope="session")
def hostile_bin(hostile_root: Path) -> Path:
    bin_dir = hostile_root / "bin"
    try:
        build(bin_dir)
    except BuildError as err:
        pytest.fail(f"building the hostile agents failed:\n{err}")
    return bin_dir


@pytest.fixture
def case_dir(hostile_root: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="case-", dir=hostile_root))
    os.chmod(path, 0o755)
    yield path
    remove_tree(path)


@pytest.fixture(scope="session", autouse=True)
def through_the_daemon() -> Iterator[None]:
    """HOSTILE_VIA=serve: every case through a `compartment serve` of the session's own."""
    if os.environ.get("HOSTILE_VIA") != "serve" or hostile_skip_reason():
        yield
        return
    sys.path.insert(0, str(Path(__file__).parent.parent))
    import hostile_run
    from serving import Daemon

    hostile_run.SERVE = Daemon().start()
    try:
        yield
    finally:
        hostile_run.SERVE.stop()
        hostile_run.SERVE = None


@pytest.fixture(scope="session")
def unprivileged_reason() -> str | None:
    """Why the "@nobody" cases cannot run (unprivileged mode needs user namespaces), or None."""
    if os.environ.get("HOSTILE_VIA") == "serve":
        return ("through compartment serve every peer's compartment is a root one: the @nobody "
                "cases test the unprivileged mode, which the daemon does not have")
    done = subprocess.run([sys.executable, "-m", "compartment", "run", "-p", "filter", "--",
                           "/bin/true"], stdin=subprocess.DEVNULL, capture_output=True,
                          user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", timeout=60,
                          check=False)
    if done.returncode == 0:
        return None
    return ("unprivileged mode does not work on this host, so the cases run as nobody cannot: "
            + done.stderr.decode(errors="replace").strip()[:300])

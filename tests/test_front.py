"""The shell front bin/compartment: the cases it answers before Python starts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

FRONT = Path(__file__).resolve().parents[1] / "bin" / "compartment"


def _front(tmp_path: Path, python: str) -> Path:
    """bin/compartment with the interpreter's path written in, as `make install` does."""
    text = FRONT.read_text()
    assert text.count("\npython=\n") == 1, "bin/compartment no longer has its python= line"
    front = tmp_path / "compartment"
    front.write_text(text.replace("\npython=\n", f"\npython={python}\n"))
    front.chmod(0o755)
    return front


@pytest.mark.parametrize(("options", "status", "line"), [
    ((), 75, "4.3.5 compartment: stdin is a directory, not a message\n"),
    (("--exit-codes", "qmail"), 111, "compartment: stdin is a directory, not a message\n"),
    (("--exit-codes=qmail",), 111, "compartment: stdin is a directory, not a message\n"),
])
def test_stdin_a_directory_is_a_temporary_failure(tmp_path, options, status, line):
    front = _front(tmp_path, "/usr/bin/python3")
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        done = subprocess.run([str(front), "run", *options, "--", "/bin/cat"], stdin=directory,
                              capture_output=True, text=True, check=False)
    finally:
        os.close(directory)
    assert (done.returncode, done.stderr) == (status, line)


def test_an_installed_interpreter_path_is_the_one_run(tmp_path):
    """`make install` writes the interpreter's path into python=; a missing one is a temporary
    failure naming it (tests/test_run.py covers the interpreter beside the script)."""
    front = _front(tmp_path, "/nonexistent/lib/compartment/bin/python")
    done = subprocess.run([str(front), "run", "--", "/bin/cat"], input="", capture_output=True,
                          text=True, check=False)
    assert done.returncode == 75
    assert done.stderr == ("4.3.5 compartment: cannot run /nonexistent/lib/compartment/bin/"
                           "python: the installation is broken\n")

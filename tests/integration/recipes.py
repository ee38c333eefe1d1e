"""The recipes of examples/*/README.md, run as printed: their commands come from the files.

A recipe is a `## ` section of a README whose ```sh blocks are run, as root, by bash with -e,
from examples/ (the recipes say so).  They use the paths of `make install`, so the fixture
installs compartment under /usr/local first and removes it afterwards; the accounts the
recipes name (alice) and a new account (bob) are made for the test and removed again, and
every system file a recipe changes is put back.
"""

from __future__ import annotations

import contextlib
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from .mailsite import REPO, SENDER, run_checked

EXAMPLES = REPO / "examples"
INSTALLED = Path("/usr/local/bin/compartment")


def recipe_commands(doc: Path, section: str) -> str:
    """The ```sh blocks of the `## section` of doc, in order, as one script."""
    text = doc.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{doc} has no section {section!r}"
    blocks = re.findall(r"^```sh\n(.*?)^```$", match[1], re.M | re.S)
    assert blocks, f"{doc}, {section!r}: no ```sh block"
    return "".join(blocks)


def run_recipe(doc: Path, section: str) -> None:
    script = recipe_commands(doc, section)
    done = subprocess.run(["bash", "-e", "-x", "-c", script], cwd=EXAMPLES, capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode != 0:
        pytest.fail(f"{doc.relative_to(REPO)}, {section!r} exited {done.returncode}:\n"
                    f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


@contextlib.contextmanager
def installed_under_usr_local() -> Iterator[None]:
    """`make install` with its defaults, as the recipes assume; `make uninstall` after."""
    def make(target: str) -> None:
        done = subprocess.run(["make", "-s", target], cwd=REPO, capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, f"make {target}: {done.stdout[-2000:]}{done.stderr[-2000:]}"

    make("install")
    try:
        yield
    finally:
        make("uninstall")


@contextlib.contextmanager
def restored(*paths: Path) -> Iterator[None]:
    """Put each file or directory back as it was (or absent) when the block ends."""
    with tempfile.TemporaryDirectory() as keep:
        saved = {}
        for index, path in enumerate(paths):
            if path.exists():
                saved[path] = Path(keep, str(index))
                _copy(path, saved[path])
        try:
            yield
        finally:
            for path in paths:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                if path in saved:
                    _copy(saved[path], path)


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True)
    else:
        shutil.copy2(source, target, follow_symlinks=False)


MARK = "compartment recipe test"  # the comment of accounts these tests make


def make_user(name: str) -> None:
    """A login account as `useradd -m` makes it (its home from /etc/skel)."""
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--comment", MARK, name],
                   check=True, capture_output=True)


@contextlib.contextmanager
def temporary_users(*names: str) -> Iterator[None]:
    """Accounts made by the test (some by the block itself) are removed with their homes;
    one left by an earlier run that was killed is removed first, anyone else's is an error."""
    for name in names:
        _remove_ours(name)
        if _comment(name) is not None:
            pytest.fail(f"an account {name!r} exists; the recipe tests make their own")
    try:
        yield
    finally:
        for name in names:
            _remove_ours(name)


def _remove_ours(name: str) -> None:
    if _comment(name) == MARK:
        subprocess.run(["userdel", "--remove", name], capture_output=True, check=True)


def _comment(name: str) -> str | None:
    try:
        return pwd.getpwnam(name).pw_gecos
    except KeyError:
        return None


def maildir_messages(user: str) -> list[bytes]:
    new = Path(pwd.getpwnam(user).pw_dir, "Maildir", "new")
    return [path.read_bytes() for path in new.iterdir()] if new.is_dir() else []


def delivered_to(user: str, marker: str) -> bytes | None:
    found = [data for data in maildir_messages(user) if marker.encode() in data]
    return found[0] if found else None


def new_message(label: str, recipient: str, body: str = "") -> tuple[str, bytes]:
    """A short message to `recipient` holding a fresh marker; (marker, message)."""
    marker = f"{label}-{uuid.uuid4().hex[:12]}"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = SENDER, recipient, f"recipe {label}"
    message.set_content(f"{body or 'A message for the recipe tests.'}\n{marker}\n")
    return marker, message.as_bytes()


def sendmail(recipient: str, data: bytes) -> None:
    run_checked(["/usr/sbin/sendmail", "-i", "-f", SENDER, "--", recipient], input=data.decode())

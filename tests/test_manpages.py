"""The man pages and docs/policy.md say what the code does: each is generated from, or checked
against, the source it describes (tools/manpages.py)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "docs" / "man"


def _generator():
    spec = importlib.util.spec_from_file_location("manpages", REPO / "tools" / "manpages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


manpages = _generator()


def test_shipped_pages_are_the_generated_ones():
    """A changed command, option or policy field changes the pages: `make man` rewrites them."""
    generated = manpages.pages()
    shipped = {path.name: path.read_text() for path in SHIPPED.iterdir()}
    assert sorted(shipped) == sorted(generated), "run `make man` and commit docs/man"
    for name, text in generated.items():
        assert shipped[name] == text, f"docs/man/{name} is stale: run `make man`"


def test_compartment_1_names_every_command_and_option():
    from compartment.cli import _parser

    page = (SHIPPED / "compartment.1").read_text().replace("\\-", "-")
    commands = manpages._subcommands(_parser())
    assert set(commands) >= {"run", "filter", "check", "policies"}
    for name, sub in commands.items():
        assert f".SS {name}" in page, name
        for action in sub._actions:
            for option in action.option_strings:
                assert option in page, (name, option)


def test_policy_reference_rows_come_from_the_field_metadata():
    """docs/policy.md (and so compartment-policy(5)) holds each field's row exactly as the
    metadata in compartment/policy.py gives its default and meaning."""
    reference = (REPO / "docs" / "policy.md").read_text()
    page = (SHIPPED / "compartment-policy.5").read_text()
    for section, rows in manpages.markdown_rows().items():
        assert f"### [{section}]" in reference
        assert f".SS {section}" in page
        for row in rows:
            assert row in reference, f"docs/policy.md lacks or differs from: {row}"


@pytest.mark.skipif(not shutil.which("man"), reason="man-db is not installed")
@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED.iterdir()))
def test_pages_format_without_warnings(name):
    result = subprocess.run(["man", "--warnings", "-l", str(SHIPPED / name)],
                            capture_output=True, text=True, env={"MANWIDTH": "80",
                                                                "PATH": "/usr/bin:/bin"},
                            check=False)
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert "compartment" in result.stdout

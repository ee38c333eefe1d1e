"""The fronts' shipped configurations: each systemd unit's command line is one the front's own
parser takes, and each unit runs its front as its own user, without privilege."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest

from compartment.front_command import parser

SYSTEMD = Path(__file__).parents[2] / "examples" / "systemd"


def _unit(name: str) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read_string((SYSTEMD / name).read_text().replace("\\\n", " "))
    return unit


@pytest.mark.parametrize("front", ["lmtp", "milter"])
def test_unit_command_line_parses_and_runs_unprivileged(front):
    service = _unit(f"compartment-{front}.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[:2] == ["/usr/local/bin/compartment", front]
    options = parser(front).parse_args(argv[2:])
    assert options.listen == "systemd" and options.program[:1] == ["--"]
    assert service["User"] == f"compartment-{front}"
    assert service["NoNewPrivileges"] == "yes" and service["CapabilityBoundingSet"] == ""
    socket = _unit(f"compartment-{front}.socket")["Socket"]
    assert socket["SocketUser"] == service["User"] and socket["SocketMode"] == "0660"

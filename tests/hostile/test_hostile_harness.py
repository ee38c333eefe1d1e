"""Positive controls: the evidence the hostile tests look for is found when it is really there,
so that "contained" means something.  Each escape channel is used here from outside, the way
an escaped agent would use it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_evidence import Outside, survivors


@pytest.fixture
def outside(case_dir: Path, hostile_bin: Path) -> Iterator[Outside]:
    found = Outside(case_dir, hostile_bin / "canary")
    yield found
    found.close()


def test_nothing_found_when_nothing_happened(outside: Outside) -> None:
    outside.listeners.close()
    assert outside.traces(b"ordinary output") == []


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGSTOP, signal.SIGKILL])
def test_signal_to_a_canary_is_found(outside: Outside, sig: int) -> None:
    os.kill(outside.canary_same.pid, sig)   # our own canary, as an escaped agent would
    time.sleep(0.2)
    assert outside.traces(b"")


@pytest.mark.parametrize("kind", ["tcp", "udp", "unix", "abstract"])
def test_reaching_a_listener_is_found(outside: Outside, kind: str) -> None:
    listeners = outside.listeners
    if kind == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", ("127.0.0.1", listeners.udp_port))
    else:
        family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        address: object = {"tcp": ("127.0.0.1", listeners.tcp_port),
                           "unix": str(outside.evidence / "sock"),
                           "abstract": "\0" + outside.abstract_name}[kind]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.connect(address)
            sock.sendall(b"x")
    time.sleep(0.2)
    listeners.close()
    assert any(kind in hit or "abstract" in hit for hit in listeners.hits), listeners.hits


def test_marker_file_and_changed_secret_are_found(outside: Outside) -> None:
    (outside.evidence / "escaped-x").write_text("x")
    (outside.evidence / "target").write_text("changed")
    traces = outside.traces(b"")
    assert any("escaped-x" in t for t in traces) and any("target" in t for t in traces)


def test_secret_in_output_is_found(outside: Outside) -> None:
    assert outside.traces(f"...{outside.env_secret}...".encode())


def test_survivor_is_found(outside: Outside) -> None:
    marker = str(outside.evidence)
    canaries = {outside.canary_same.pid, outside.canary_root.pid}   # they carry it too
    sleeper = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(30)", marker])
    time.sleep(0.1)
    try:
        assert survivors(marker, canaries, grace_s=0)
    finally:
        sleeper.kill()   # our own child
        sleeper.wait()
    assert not survivors(marker, canaries, grace_s=0)

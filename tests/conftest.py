"""Fixtures shared by the test modules at this level."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def static_cat(tmp_path_factory) -> str:
    """A statically linked cat for the empty root of the strict policy."""
    directory = tmp_path_factory.mktemp("static")
    source = directory / "scat.c"
    source.write_text("#include <unistd.h>\nint main(void){char b[65536];ssize_t n;"
                      "while((n=read(0,b,sizeof b))>0)if(write(1,b,n)!=n)return 74;"
                      "return n<0?74:0;}\n")
    binary = directory / "scat"
    assert os.system(f"gcc -static -O2 -o {binary} {source}") == 0, "gcc -static failed"
    binary.chmod(0o755)
    directory.chmod(0o755)
    return str(binary)

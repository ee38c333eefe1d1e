"""Fixtures shared by the test modules at this level."""

from __future__ import annotations

import os

import pytest

# fallocate(0) with FALLOC_FL_KEEP_SIZE, then with mode 0: the errno of each (0: it worked).
RESERVE_C = """#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
int main(void){int keep=fallocate(0,FALLOC_FL_KEEP_SIZE,0,256<<20)?errno:0;
int grow=fallocate(0,0,0,4096)?errno:0;printf("%d %d\\n",keep,grow);return 0;}
"""


def _static(tmp_path_factory: pytest.TempPathFactory, name: str, source: str) -> str:
    directory = tmp_path_factory.mktemp("static")
    (directory / f"{name}.c").write_text(source)
    binary = directory / name
    assert os.system(f"gcc -static -O2 -o {binary} {directory / name}.c") == 0, \
        "gcc -static failed"
    binary.chmod(0o755)
    directory.chmod(0o755)
    return str(binary)


@pytest.fixture(scope="session")
def static_cat(tmp_path_factory) -> str:
    """A statically linked cat for the empty root of the strict policy."""
    return _static(tmp_path_factory, "scat", "#include <unistd.h>\nint main(void){char "
                   "b[65536];ssize_t n;while((n=read(0,b,sizeof b))>0)if(write(1,b,n)!=n)"
                   "return 74;return n<0?74:0;}\n")


@pytest.fixture(scope="session")
def static_reserve(tmp_path_factory) -> str:
    """A static program that tries both kinds of fallocate on its stdin."""
    return _static(tmp_path_factory, "reserve", RESERVE_C)

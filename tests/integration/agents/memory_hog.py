#!/usr/bin/python3
"""Hostile agent: allocates memory until the compartment's memory limit stops it."""

import sys

CHUNK_BYTES = 16 * 1024 * 1024
LIMIT_BYTES = 2 * 1024 * 1024 * 1024  # stops by itself, far below the machine's memory

sys.stdin.buffer.read()
hoard = []
while len(hoard) * CHUNK_BYTES < LIMIT_BYTES:
    hoard.append(bytearray(CHUNK_BYTES))  # bytearray touches its pages: real memory
print("memory_hog: allocated 2 GiB without being stopped", file=sys.stderr)
sys.exit(0)

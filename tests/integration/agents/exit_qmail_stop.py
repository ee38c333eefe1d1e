#!/usr/bin/python3
"""Agent in qmail's convention: exit 99, "delivered, and ignore the rest of .qmail"."""

import sys

QMAIL_OK_STOP = 99

sys.stdin.buffer.read()
sys.exit(QMAIL_OK_STOP)

#!/usr/bin/python3
"""Agent that refuses the message for good: exit 77 (EX_NOPERM), which every MTA bounces."""

import sys

EX_NOPERM = 77

sys.stdin.buffer.read()
print("mailbox disabled by its owner", file=sys.stderr)
sys.exit(EX_NOPERM)

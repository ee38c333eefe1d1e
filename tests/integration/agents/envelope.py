#!/usr/bin/python3
"""Agent that reports what it was given: arguments, environment, kind of stdin.

    envelope.py                  print one JSON object on stdout
    envelope.py MAILDIR [ARG...] store it as a file in MAILDIR/new (for MTA tests, where
                                 stdout only reaches a log); ARGs are recorded as "args"

Reads the whole message first (compartment's deliver policy treats an agent that exits
without reading its input as a temporary failure).
"""

import json
import os
import secrets
import stat
import sys

mode = os.fstat(0).st_mode
try:
    os.lseek(0, 0, os.SEEK_SET)  # qmail-local hands a seekable queue file
    seekable = True
except OSError:
    seekable = False
size = len(sys.stdin.buffer.read())
record = {"args": sys.argv[2:], "env": dict(os.environ), "seekable": seekable,
          "regular_file": stat.S_ISREG(mode), "bytes": size}
if len(sys.argv) < 2:
    json.dump(record, sys.stdout)
    sys.exit(0)
name = f"envelope-{secrets.token_hex(8)}"
tmp_path = os.path.join(sys.argv[1], "tmp", name)
with open(tmp_path, "x", encoding="utf-8") as out:
    json.dump(record, out)
os.rename(tmp_path, os.path.join(sys.argv[1], "new", name))

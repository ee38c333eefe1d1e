#!/usr/bin/python3
"""Hostile agent: reads the message, then hangs for 5 minutes (the wall-clock limit must fire).

It gives up by itself after 300 s so that a broken limit cannot leave it running forever.
"""

import sys
import time

sys.stdin.buffer.read()
time.sleep(300)

#!/usr/bin/python3
"""Hostile agent: opens an IPv4 socket, which every compartment policy forbids.

Under compartment the socket(AF_INET) call is a seccomp violation and the agent is killed
before it returns; if it does return, the confinement failed and the agent says so.
"""

import socket
import sys

sys.stdin.buffer.read()
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
print("socket_inet: socket(AF_INET) was allowed", file=sys.stderr)
sys.exit(0)  # claims success: a delivery here means the filter did not stop it

#!/bin/sh
# What a compromised filter would try.  Each attempt is stopped; the last one gets it killed.
echo "hostile: reading /etc/shadow:"; cat /etc/shadow 2>&1 | head -1
echo "hostile: writing /usr/bin/evil:"; touch /usr/bin/evil 2>&1
echo "hostile: fork bomb (bounded by RLIMIT_NPROC):"
(i=0; while [ $i -lt 200 ]; do sleep 1 & i=$((i+1)); done) 2>/tmp/fork-errors
echo "  stopped: $(tail -1 /tmp/fork-errors)"
echo "hostile: opening a TCP socket to 127.0.0.1:25:"
exec python3 -c 'import socket; socket.create_connection(("127.0.0.1", 25))'

# Network from Python: connect to the test's loopback TCP listener and send a word.
import socket
import sys

port = int(sys.argv[2])
try:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.sendall(b"hostile-python")
except OSError as err:
    print(f"refused: {err}")
    raise SystemExit(75) from None
raise SystemExit(13)

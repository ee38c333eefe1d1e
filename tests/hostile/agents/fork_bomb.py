# Fork bomb in Python, bounded: fork until refused, every child sleeps; then wait forever.
import os
import time

made = 0
try:
    for made in range(5000):  # noqa: B007 - the count is printed below
        if os.fork() == 0:
            time.sleep(3600)
            os._exit(0)
except OSError as err:
    print(f"forked {made}: {err}", flush=True)
time.sleep(3600)

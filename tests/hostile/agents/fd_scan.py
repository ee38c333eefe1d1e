# Leak: read every descriptor above 2; the test looks for its secret file's text in the output.
import contextlib
import os

for fd in range(3, 1024):
    with contextlib.suppress(OSError):   # not seekable: read from where it is
        os.lseek(fd, 0, os.SEEK_SET)
    try:
        data = os.read(fd, 4096)
    except OSError:
        continue
    print(f"fd {fd}: {data!r}")
raise SystemExit(75)

# List everything reachable from / (bounded) so the test can compare it with the host.
import os

count = 0
for top, dirs, files in os.walk("/", onerror=lambda err: None):
    dirs[:] = [d for d in dirs if top != "/" or d not in ("proc", "sys")]
    for name in dirs + files:
        print(os.path.join(top, name))
        count += 1
    if count > 200000:
        break
raise SystemExit(75)

# Leak: print the whole environment; the test looks for the caller's secret variable in it.
import os

for name, value in sorted(os.environ.items()):
    print(f"{name}={value}")
raise SystemExit(75)

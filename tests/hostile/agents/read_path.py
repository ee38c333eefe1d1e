# Read one path given by the test and print it.
import sys

try:
    with open(sys.argv[9], "rb") as file:
        print(file.read(4096))
except OSError as err:
    print(f"refused: {err}")
    raise SystemExit(75) from None
raise SystemExit(13)

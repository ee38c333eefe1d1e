"""Run a front as the tests do: as root, with the stand-in for the supervisor's client.

    python tests/fronts/launch.py lmtp|milter OPTIONS -- PROGRAM [ARG...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from standin import submit  # noqa: E402

from compartment.front_command import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], submit=submit, allow_root=True))

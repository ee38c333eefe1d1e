"""python -m compartment: the same as the compartment command."""

import sys

from compartment.cli import main

sys.exit(main())

"""compartment: run mail delivery agents and filters confined by the kernel.

    from compartment import Policy, run
    result = run(["/usr/local/bin/myfilter"], Policy.load("filter"), stdin=message_fd)
    sys.exit(result.exit_status)
"""

from compartment.api import run
from compartment.exits import Convention, Outcome
from compartment.policy import Policy, PolicyError
from compartment.report import Result

__all__ = ["Convention", "Outcome", "Policy", "PolicyError", "Result", "run"]

"""compartment: run mail delivery agents and filters confined by the kernel.

    from compartment import Policy, run
    result = run(["/usr/local/bin/myfilter"], Policy.load("filter"), stdin=message_fd)
    sys.exit(result.exit_status)

    from compartment import Failed, isolate
    with isolate(mailfilters.strip_attachments) as strip:   # a function, in DJB's prison
        new_message = strip(message_bytes)                    # or compartment.Failed
"""

from compartment.api import run
from compartment.exits import Convention, Failed, Outcome
from compartment.isolate import Isolated, isolate
from compartment.policy import Policy, PolicyError
from compartment.report import Result

__all__ = ["Convention", "Failed", "Isolated", "Outcome", "Policy", "PolicyError", "Result",
           "isolate", "run"]

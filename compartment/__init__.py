"""compartment: run mail delivery agents and filters confined by the kernel.

    from compartment import Policy, run
    result = run(["/usr/local/bin/myfilter"], Policy.load("filter"), stdin=message_fd)
    sys.exit(result.exit_status)

    from compartment import submit          # through the resident supervisor (compartment serve)
    result = submit(["/usr/local/bin/myfilter"], "filter", stdin=message_fd)

    from compartment import Failed, isolate
    with isolate(mailfilters.strip_attachments) as strip:   # a function, in DJB's prison
        new_message = strip(message_bytes)                    # or compartment.Failed

The names are imported on first use (PEP 562), so that importing a submodule costs only that
submodule: the `submit` client and the spawner start small and must not load the policy loader.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs the client 1.5 ms
if TYPE_CHECKING:
    from compartment.api import run
    from compartment.client import submit
    from compartment.exits import Convention, Failed, Outcome
    from compartment.isolate import Isolated, isolate
    from compartment.policy import Policy, PolicyError
    from compartment.report import Result

_HOMES = {"run": "compartment.api", "submit": "compartment.client",
          "Convention": "compartment.exits", "Failed": "compartment.exits",
          "Outcome": "compartment.exits", "Isolated": "compartment.isolate",
          "isolate": "compartment.isolate", "Policy": "compartment.policy",
          "PolicyError": "compartment.policy", "Result": "compartment.report"}

__all__ = ["Convention", "Failed", "Isolated", "Outcome", "Policy", "PolicyError", "Result",
           "isolate", "run", "submit"]


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'compartment' has no attribute {name!r}")
    value = getattr(__import__(_HOMES[name], fromlist=[name]), name)
    globals()[name] = value  # once: later lookups do not come here
    return value

"""A stand-in for compartment.submit (the resident supervisor's client) while the fronts are
tested without the daemon: each call runs compartment.run in a process of its own, as root,
with the caller's three descriptors, and returns the Result it printed.

It keeps the client's contract: a Result, never an exception; and the supervisor unreachable
(here: no file at socket_path) is an internal-error Result with the temporary status and the
client's reason line on stderr.  compartment.run wants a single-threaded caller, hence the
process per call (the fronts call submit from worker threads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from compartment.exits import Outcome
from compartment.report import Result

WORKER = """
import json, os, sys
from compartment.api import failure, finish, run
from compartment.exits import Convention, Outcome
from compartment.policy import Policy, PolicyError
request = json.loads(sys.argv[1])
caller = Convention(request["exit_codes"])
try:
    policy = Policy.load(request["policy"], request["overrides"])
except PolicyError as err:
    result = failure(Outcome.CONFIG_ERROR, f"policy: {err}", request["policy"], request["argv"],
                     caller)
    finish(result, 2, b"", "", caller)
else:
    result = run(request["argv"], policy, stdin=0, stdout=1, stderr=2, env=request["env"],
                 exit_codes=caller, agent_exit_codes=request["agent_exit_codes"])
os.write(request["result_fd"], result.to_json().encode())
"""


def submit(argv: Sequence[str], policy_name: str = "filter", *, stdin: int = 0, stdout: int = 1,
           stderr: int = 2, env: Mapping[str, str] | None = None, exit_codes: str = "sysexits",
           agent_exit_codes: str | None = None, overrides: Sequence[str] = (),
           socket_path: str = "/run/compartment/socket", **_: object) -> Result:
    if not os.path.exists(socket_path):
        reason = (f"cannot reach the daemon at {socket_path}: No such file or directory (is "
                  "compartment serve running?); the message is kept")
        os.write(stderr, f"4.3.0 compartment: {reason}\n".encode())
        return Result(outcome=Outcome.INTERNAL_ERROR, exit_status=75, reason=reason,
                      policy=policy_name, program=argv[0] if argv else "", argv=tuple(argv),
                      wall_s=0.0)
    request = {"argv": list(argv), "policy": policy_name, "overrides": list(overrides),
               "env": dict(env or {}), "exit_codes": exit_codes,
               "agent_exit_codes": agent_exit_codes}
    result_r, result_w = os.pipe()
    request["result_fd"] = result_w
    try:
        with subprocess.Popen([sys.executable, "-I", "-c", WORKER, json.dumps(request)],
                              stdin=stdin, stdout=stdout, stderr=stderr,
                              pass_fds=(result_w,), env={"PATH": "/usr/bin:/bin"}) as worker:
            os.close(result_w)  # the worker has its copy: the pipe ends when it exits
            result_w = -1
            data = b""
            while chunk := os.read(result_r, 65536):
                data += chunk
            worker.wait()
    finally:
        os.close(result_r)
        if result_w >= 0:
            os.close(result_w)
    fields = json.loads(data)
    del fields["time"]
    fields["outcome"] = Outcome(fields["outcome"])
    fields["argv"] = tuple(fields["argv"])
    return Result(**fields)

"""Peak memory of a supervisor carrying one large message, measured in a process of its own.

usage: python rss_probe.py {compartment,unconfined,idle} MESSAGE_BYTES

The message is streamed by `head -c MESSAGE_BYTES /dev/zero` into a 1 MiB pipe handed to the
agent (/bin/cat) as fd 0; its output goes to /dev/null through the supervisor (or, for
`unconfined`, through the same relay as the bench's baseline).  Nothing here ever holds the
message.  Prints one JSON line: this process's peak RSS (ru_maxrss and VmHWM), bytes out, time.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import baseline

CAT = ["/bin/cat"]


def _vmhwm_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def _generator(message_bytes: int) -> tuple[int, int]:
    """Start the message source; returns (its pid, the read end handed to the agent)."""
    message_r, message_w = baseline.make_pipe()
    try:
        pid = os.posix_spawn("/usr/bin/head", ["head", "-c", str(message_bytes), "/dev/zero"],
                             baseline.CLEAN_ENV,
                             file_actions=[(os.POSIX_SPAWN_DUP2, message_w, 1)])
    finally:
        os.close(message_w)
    return pid, message_r


def _deliver(method: str, message_r: int) -> int:
    sink, err = baseline.discard_sinks()
    if method == "unconfined":
        return baseline.spawn_relay(CAT, message_r, sink, err)
    import compartment  # only this method pays for the import

    policy = compartment.Policy.load("filter", overrides={"limits.output_bytes": "8G"})
    result = compartment.run(CAT, policy, stdin=message_r, stdout=sink, stderr=err)
    if result.outcome != "ok":
        raise SystemExit(f"compartment: {result.outcome}: {result.reason}")
    return result.bytes_out


def main() -> None:
    method, message_bytes = sys.argv[1], int(sys.argv[2])
    started = time.perf_counter()
    bytes_out = 0
    if method != "idle":
        generator_pid, message_r = _generator(message_bytes)
        bytes_out = _deliver(method, message_r)
        os.close(message_r)
        os.waitpid(generator_pid, 0)
    seconds = time.perf_counter() - started
    print(json.dumps({"method": method, "message_bytes": message_bytes, "bytes_out": bytes_out,
                      "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "vmhwm_kib": _vmhwm_kib(), "seconds": seconds}))


if __name__ == "__main__":
    main()

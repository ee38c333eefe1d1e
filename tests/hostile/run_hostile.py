#!/usr/bin/env python3
"""`make hostile`: run every hostile case, print one line per case and a summary.

    sudo .venv/bin/python tests/hostile/run_hostile.py [-k SUBSTRING] [-v] [--serve]

--serve: every case through a `compartment serve` the harness starts (not the @nobody cases:
they test the unprivileged mode, which the daemon does not have).

Exit status 0 only if every case was contained with the right exit class; 1 if any escaped or
showed a wrong class; 2 if the cases cannot run here (the reason is printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import hostile_skip_reason  # noqa: E402
from hostile_between import PAIRS, run_pair  # noqa: E402
from hostile_build import BuildError, build  # noqa: E402
from hostile_cases import CASES  # noqa: E402
from hostile_evidence import remove_tree  # noqa: E402
from hostile_run import Verdict, run_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="run only cases whose name contains this")
    parser.add_argument("-v", action="store_true", help="show what each agent printed")
    parser.add_argument("--serve", action="store_true",
                        help="through a compartment serve of the harness's own")
    args = parser.parse_args()
    reason = hostile_skip_reason()
    if reason:
        print(f"hostile: cannot run: {reason}", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    os.chmod(root, 0o755)
    try:
        if not args.serve:
            return _run_all(root, args.k, args.v)
        sys.path.insert(0, str(Path(__file__).parent.parent))
        import hostile_run
        from serving import Daemon

        hostile_run.SERVE = Daemon().start()
        try:
            return _run_all(root, args.k, args.v, serve=True)
        finally:
            hostile_run.SERVE.stop()
    finally:
        remove_tree(root)


def _run_all(root: Path, only: str, verbose: bool, serve: bool = False) -> int:
    try:
        build(root / "bin")
    except BuildError as err:
        print(f"hostile: building the agents failed:\n{err}", file=sys.stderr)
        return 2
    verdicts: list[Verdict] = []
    started = time.monotonic()
    for case in [c for c in CASES if only in c.name and not (serve and c.user != "root")]:
        verdicts.append(_one(lambda d, c=case: run_case(c, d, root / "bin"), root, verbose))
    for pair in [p for p in PAIRS if only in p.name and not (serve and p.user != "root")]:
        verdicts.append(_one(lambda d, p=pair: run_pair(p, d, root / "bin"), root, verbose))
    escaped = sum(not v.contained or bool(v.error) for v in verdicts)
    wrong = sum(bool(v.wrong) for v in verdicts)
    print(f"{len(verdicts) - escaped} contained, {escaped} escaped; "
          f"{wrong} with a wrong exit class ({time.monotonic() - started:.0f}s)")
    return 1 if escaped or wrong else 0


def _one(run: object, root: Path, verbose: bool) -> Verdict:
    case_dir = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    os.chmod(case_dir, 0o755)
    try:
        verdict = run(case_dir)  # type: ignore[operator]
    finally:
        remove_tree(case_dir)
    print(verdict.line(), flush=True)
    if verbose and verdict.seen:
        print("          stdout:", verdict.seen.stdout[:300])
        print("          stderr:", verdict.seen.stderr[:300])
        print("          reason:", verdict.seen.reason)
    return verdict


if __name__ == "__main__":
    sys.exit(main())

"""`python -m testbed.hog CORES DURATION_S`: keep CORES cores busy for DURATION_S, then exit.

The cpu_hog scenario event runs it in a host (its namespace and cgroups) or on the machine. Every
worker stops by itself at the deadline, so nothing outlives the event even if the runner dies;
the injector also kills the process group when the run ends."""
from __future__ import annotations

import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m testbed.hog CORES DURATION_S", file=sys.stderr)
        return 2
    cores, duration_s = int(args[0]), float(args[1])
    if cores < 1 or duration_s <= 0:
        print(f"testbed.hog: need CORES >= 1 and DURATION_S > 0 (got {cores}, {duration_s})", file=sys.stderr)
        return 2
    end = time.monotonic() + duration_s
    children = []
    for _ in range(cores - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)
    while time.monotonic() < end:
        pass
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

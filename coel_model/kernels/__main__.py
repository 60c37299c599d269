"""`python -m coel_model.kernels --build`: compile the native kernels into the cache (install.sh
runs it; a second run finds the library and returns at once). Without --build: print the status."""
from __future__ import annotations

import argparse
import subprocess
import sys

from coel_model import kernels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m coel_model.kernels")
    ap.add_argument("--build", action="store_true", help="compile the native library if it is not built")
    args = ap.parse_args(argv)
    if args.build:
        try:
            path = kernels.build()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # the torch fallback still works: say why, do not fail the install
            print(f"native kernels not built: {exc}; processes use the torch fallback", file=sys.stderr)
            return 0
        print(f"native kernels: {path}")
        return 0
    print(kernels.status())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

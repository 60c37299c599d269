"""The `coel` command: one entry point, subcommands registered by each room.

The top room: it imports the rooms below and none imports it. Each room (model, nodes,
controller, testbed) has a `cli` module with a `register(subparsers)` function; this module only
stitches them together so the rooms can grow their commands without touching each other.
"""
from __future__ import annotations

import argparse
import importlib
import sys

ROOM_CLIS = ("coel_model.commands", "coel_model.quant_cli", "controller.cli", "nodes.cli", "testbed.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for modname in ROOM_CLIS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:  # room has no commands yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors carry their own message
        from coel_model.errors import CoelError
        if isinstance(exc, CoelError):
            print(f"coel {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

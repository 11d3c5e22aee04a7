"""`raymed …`: one entry point; each area registers its own subcommands.

Errors a user can act on (`RaymedError`) print as one line and exit 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from raymed import __version__
from raymed.console import VERBOSE_ENV
from raymed.errors import RaymedError

# Modules with `register(subparsers)`; the order is the order of `raymed --help`.
COMMAND_MODULES = [
    "raymed.demo",
    "raymed.data.commands",
    "raymed.engine.commands",
    "raymed.tuning.commands",
    "raymed.evaluation.commands",
    "raymed.active.commands",
    "raymed.cluster.commands",
    "raymed.serving.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymed",
        description="Train, tune and serve medical-imaging anomaly detectors and generators on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"raymed {__version__}")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    try:
        return int(args.run(args) or 0)
    except RaymedError as err:
        print(f"raymed: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raymed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

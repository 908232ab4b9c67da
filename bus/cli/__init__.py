"""The ``lcbus`` command line.

Each subcommand group lives in its own module exposing
``register(subparsers)``; :data:`COMMAND_MODULES` lists them in help order.
Entrypoints read settings from the environment here and nowhere deeper.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "serve",
    "token",
    "tail",
    "trace",
    "webhooks",
    "status",
    "dlq",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcbus",
        description="A Redis event bus for LangChain: operate workers, streams and webhooks.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"bus.cli.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the ``shoal`` command: dispatches to a subcommand module.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
this file only wires them together, so that ``shoal --help`` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

_SUBCOMMANDS = {
    "run": ("shoal.runner.launch", "launch a training script on N processes (this host or several)"),
    "doctor": ("shoal.runner.doctor", "report what this machine has and what shoal will use"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Shoal: fast, fail-loud data-parallel training.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in _SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sp)
    return parser


def _version() -> str:
    from shoal import __version__  # noqa: PLC0415

    return f"shoal {__version__}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(_SUBCOMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The ``dgserve`` command. Each area registers its own subcommands:
``dgserve.engine.cli``, ``dgserve.serving.cli``, ``dgserve.operator.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

AREAS = ("dgserve.engine.cli", "dgserve.serving.cli", "dgserve.operator.cli", "dgserve.loadtest.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgserve", description="Serve block-diffusion language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # area not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The `vlm` command line. Sub-commands are plugged in by the suite's packages through the entry-point
group `vlm.commands` (see pyproject.toml): each entry is a `register(subparsers)` function, so `vlm` itself
depends on none of them."""

import argparse
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm", description="Build, train, run and evaluate vision-language models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in sorted(entry_points(group="vlm.commands"), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def main(argv=None) -> int:
    from transformers.utils import logging as transformers_logging

    # transformers draws a bar for every weight load: noise on each command, and a mess in logs off a terminal
    transformers_logging.disable_progress_bar()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

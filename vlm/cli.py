"""The `vlm` command line. Sub-commands are plugged in by the suite's packages through the entry-point
group `vlm.commands` (see pyproject.toml): each entry is a `register(subparsers)` function, so `vlm` itself
depends on none of them."""

import argparse
import sys
from importlib.metadata import entry_points


BACKBONES = {  # family -> (timm names, operator)
    "vit": ("vit_{tiny,small,base}_patch16_224", "ViT from timm: softmax attention"),
    "davit": ("davit_{tiny,small,base}", "DaViT from timm: spatial + channel attention"),
    "lookupvit": ("lookupvit_{tiny,small,base}_patch16_224", "compressed tokens, bidirectional cross-attention"),
    "biformer": ("biformer_{tiny,small,base}", "bi-level routing attention"),
    "vim": ("vim_{tiny,small,base}_patch16_224", "Vision Mamba: bidirectional selective scan"),
    "vig": ("vig_{tiny,small,base}_patch16_224", "bidirectional gated linear attention"),
}


def list_command(args) -> int:
    """Print the entries of one kind, one per line: name, description (and options)."""
    if args.kind == "backbones":
        rows = [(name, f"{description}; timm names {names}") for name, (names, description) in BACKBONES.items()]
    elif args.kind == "modes":
        from .masks import ATTENTION_MODE_DESCRIPTIONS

        rows = list(ATTENTION_MODE_DESCRIPTIONS.items())
    else:
        from .mitigation.spec import METHOD_DEFAULTS, METHOD_DESCRIPTIONS

        rows = [(name, f"{description}; options: " + ", ".join(
            f"{key}={value}" for key, value in METHOD_DEFAULTS[name].items() if key != "processor"))
            for name, description in METHOD_DESCRIPTIONS.items()]
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="vlm", description="Build, train, run and evaluate vision-language models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('vlm-suite')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    listing = subparsers.add_parser("list", help="list the backbones, attention modes or mitigation methods",
                                    description="List the backbones, attention modes or mitigation methods.")
    listing.add_argument("kind", choices=["backbones", "modes", "mitigations"], help="what to list")
    listing.set_defaults(func=list_command)
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

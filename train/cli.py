"""`vlm train`: run a training recipe in this process (the same code as `accelerate launch -m train.finetune`).

The arguments are shared with `python -m train.finetune` (`train.config.add_arguments`); the training code is
imported only when the command runs."""

import argparse

from .config import add_arguments, config_from_args


def _run(args) -> int:
    from .finetune import train

    final = train(config_from_args(args))
    print(f"final model: {final}")
    return 0


def register(subparsers):
    """Add `vlm train --config RECIPE [--resume] [key=value ...]`."""
    parser = subparsers.add_parser(
        "train", help="fine-tune a VLM from a recipe (train/configs/*.yaml)",
        description="Train from a recipe YAML with dotted key=value overrides. For several processes or GPUs use "
                    "`accelerate launch -m train.finetune --config ...` (see docs/training.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=_run)

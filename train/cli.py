"""`vlm train`: run a training recipe in this process (the same code as `accelerate launch -m train.finetune`).

The arguments are shared with `python -m train.finetune`; nothing heavy is imported until the command runs."""

import argparse


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--config", required=True,
                        help="recipe YAML, or the name of a shipped recipe (demo_tiny, smollm2_lora_scenes, ...)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3")


def config_from_args(args):
    """The `TrainConfig` named by parsed `add_arguments` arguments."""
    from .config import load_config

    config = load_config(args.config, args.overrides)
    if args.resume:
        config.resume = True
    return config


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

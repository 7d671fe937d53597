"""`vlm data ...`: generate the synthetic scenes, or POPE question files for any COCO instances file."""

import time
from pathlib import Path

from vlm.cli import positive_int

from .jsonl import write_jsonl
from .pope import POPE_STRATEGIES, generate_pope
from .scenes import SceneConfig, generate_scenes


def register(subparsers):
    """Add the `data` command and its sub-commands to the `vlm` parser."""
    data = subparsers.add_parser("data", help="generate datasets (synthetic scenes, POPE questions)")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    scenes = commands.add_parser("scenes", help="synthetic shape scenes with controllable co-occurrence bias")
    scenes.add_argument("--out", required=True, type=Path, help="output folder")
    scenes.add_argument("--images", required=True, type=positive_int, help="number of images over all splits")
    scenes.add_argument("--seed", type=int, default=0, help="random seed of the scenes")
    scenes.add_argument("--size", type=int, default=None, help="image side in pixels (default: the config's, 64)")
    scenes.add_argument("--config", type=Path, default=None, help="SceneConfig as YAML or JSON (bias settings)")
    scenes.add_argument("--no-render", action="store_true", help="write the annotations only")
    scenes.set_defaults(func=run_scenes)

    pope = commands.add_parser("pope", help="POPE question files (random, popular, adversarial) from COCO instances")
    pope.add_argument("--instances", required=True, type=Path, help="COCO instances JSON")
    pope.add_argument("--out", required=True, type=Path, help="output folder")
    pope.add_argument("--prefix", default="pope", help="files are {prefix}_{strategy}.json")
    pope.add_argument("--images", type=int, default=500, help="images to sample (0: all eligible)")
    pope.add_argument("--per-image", type=positive_int, default=3, help="yes (and no) questions per image")
    pope.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    pope.set_defaults(func=run_pope)


def run_scenes(args) -> int:
    config = SceneConfig.from_file(args.config) if args.config else SceneConfig()
    if args.size is not None:
        config.image_size = args.size
        config.validate()
    start = time.perf_counter()
    paths = generate_scenes(args.out, args.images, seed=args.seed, config=config, render=not args.no_render)
    seconds = time.perf_counter() - start
    print(f"wrote {args.images} scenes ({config.image_size}px) to {args.out} in {seconds:.1f} s "
          f"({args.images / max(seconds, 1e-9):.0f} images/s)")
    for split, path in paths["instances"].items():
        pope = ", ".join(file.name for file in paths["pope"][split].values())
        print(f"  {split}: {path.name}, {paths['captions'][split].name}, {paths['conversations'][split].name}, {pope}")
    return 0


def run_pope(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    for strategy in POPE_STRATEGIES:
        questions = generate_pope(args.instances, strategy, num_images=args.images or None,
                                  num_per_image=args.per_image, seed=args.seed)
        path = args.out / f"{args.prefix}_{strategy}.json"
        write_jsonl(path, questions)
        print(f"{path}: {len(questions)} questions")
    return 0

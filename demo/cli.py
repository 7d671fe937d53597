"""`vlm demo`: the whole suite on the built-in synthetic scenes, on a CPU, in minutes.

1. generate the scenes (train/val/test) with the hallucination-lab co-occurrence bias;
2. train a small VLM from scratch with `train.finetune.train` (the code `accelerate launch` runs) on the
   `demo_tiny` recipe;
3. evaluate on the test split: COCO caption metrics, CHAIR, POPE (random/popular/adversarial), VQA accuracy,
   then adversarial POPE and CHAIR again with each mitigation head;
4. write `report.md` and `report.html` with the numbers and plots.

Same seed, same numbers: the training length is a number of steps (or derived from `--minutes`, calibrated on a
2-core machine), never a wall-clock cut-off.
"""

import sys
from pathlib import Path

from vlm.cli import positive_int

from .recipe import COMPARE_ALL_MINUTES, DEFAULT_BACKBONE, DEFAULT_STEPS, DEMO_BACKBONES, DEMO_IMAGES, STEPS_PER_MINUTE
from .report import pct
from .run import compare_all, run_demo
from .seeds import compare_seeds


def main(args) -> int:
    from train.finetune import TrainingInterrupted

    try:
        return _run(args)
    except TrainingInterrupted:  # the demo resumes by itself: the training's own resume command is not needed
        print(f"vlm demo continues where it stopped when the same command runs again (--out {args.out})",
              file=sys.stderr)
        raise


def _run(args) -> int:
    if args.backbone == "all":
        compare_all(Path(args.out), args.minutes, args.seed, args.images, not args.no_progress)
        return 0
    if args.seeds:
        compare_seeds(Path(args.out), args.seeds, args.backbone, args.attention_mode, args.minutes, args.images,
                      args.steps, not args.no_progress)
        return 0
    result = run_demo(Path(args.out), args.backbone, args.attention_mode, args.minutes, args.seed, args.images,
                      args.steps, progress=not args.no_progress)
    report = Path(args.out) / "report.md"
    pope = result["results"]["pope"]["splits"]
    print("POPE accuracy random/popular/adversarial: " + " / ".join(pct(pope[s]["accuracy"]) for s in pope))
    print(f"report: {report} (and report.html)")
    return 0


def register(subparsers) -> None:
    from vlm.masks import ATTENTION_MODES

    parser = subparsers.add_parser("demo", help="train and evaluate a small VLM on the built-in scenes, with a report")
    parser.add_argument("--out", default="runs/demo", help="output folder (re-running resumes)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=[*DEMO_BACKBONES, "all"],
                        help="vision backbone, or 'all' for the comparison table")
    parser.add_argument("--attention-mode", default="causal", choices=ATTENTION_MODES,
                        help="attention mask of the LLM (see `vlm list modes`)")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"budget on a 2-core CPU at {STEPS_PER_MINUTE} steps/min, sets the training steps (default: "
                             f"{DEFAULT_STEPS} steps, about 9 minutes in all on 2 quiet cores; --backbone all: "
                             f"{COMPARE_ALL_MINUTES:g} minutes for all runs)")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps (overrides --minutes)")
    parser.add_argument("--images", type=positive_int, default=DEMO_IMAGES, help="synthetic scenes to generate")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the scenes and the training")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run the demo once per seed (into OUT/seed-N) and write OUT/seeds.md: each mitigation's "
                             "effect against the seed-to-seed spread")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=main)

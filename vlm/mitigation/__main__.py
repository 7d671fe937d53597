"""`python -m vlm.mitigation --model DIR --images DIR [--num 32]`: measure the statistics of `calibration.py` on a
folder of images and save them beside the model, where `from_pretrained` finds them."""

import argparse
from pathlib import Path

from PIL import Image

from ..modeling import VisionLanguageModel
from ..processing import VLMProcessor
from .calibration import DEFAULT_PROMPT, calibrate_mitigation_stats, save_mitigation_stats


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vlm.mitigation",
                                     description="Measure mitigation statistics and save them beside the model")
    parser.add_argument("--model", required=True, help="a saved VisionLanguageModel folder (with its processor)")
    parser.add_argument("--images", required=True, help="a folder of images to calibrate on")
    parser.add_argument("--num", type=int, default=32, help="how many images (sorted by name) to use")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    args = parser.parse_args(argv)

    files = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:args.num]
    if not files:
        raise SystemExit(f"no .png/.jpg images under {args.images}")
    model = VisionLanguageModel.from_pretrained(args.model).eval()
    processor = VLMProcessor.from_pretrained(args.model)
    images = [Image.open(path).convert("RGB") for path in files]
    stats = calibrate_mitigation_stats(model, processor, images, args.prompt)
    path = save_mitigation_stats(stats, args.model)
    print(f"wrote {path}: sink_dims={stats['sink_dims'].tolist()} from {len(images)} images")


if __name__ == "__main__":
    main()

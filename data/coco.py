"""COCO captions as training/evaluation samples: `captions_*.json` files and Karpathy-split files.

Two formats are read:
- COCO captions (`captions_train2014.json`, and the synthetic scenes' `captions_{split}.json`):
  `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`, image paths relative to
  `image_root`;
- Karpathy splits (`dataset_coco.json`): `{"images": [{"filepath", "filename", "split", "cocoid"|"imgid",
  "sentences": [{"raw"}]}]}`, image paths `image_root/filepath/filename`.
"""

import random

from torch.utils.data import Dataset

from vlm.prompts import SHORT_CAPTION_PROMPT

from .images import DEFAULT_MAX_PIXELS, check_images_exist, load_image, resolve_image_path
from .jsonl import DataFormatError, read_json, require
from .messages import single_turn


def _coco_captions(data: dict, path) -> list[dict]:
    images = require(data, "images", str(path), list)
    by_id = {}
    for index, image in enumerate(images):
        source = f"{path}: images[{index}]"
        by_id[require(image, "id", source)] = {"id": image["id"], "file": require(image, "file_name", source, str),
                                               "references": []}
    for index, annotation in enumerate(require(data, "annotations", str(path), list)):
        source = f"{path}: annotations[{index}]"
        image_id = require(annotation, "image_id", source)
        if image_id not in by_id:
            raise DataFormatError(f"{source}: image_id {image_id!r} is not in 'images'")
        by_id[image_id]["references"].append(require(annotation, "caption", source, str).strip())
    return list(by_id.values())


def _karpathy_captions(data: dict, path, splits) -> list[dict]:
    entries = []
    for index, image in enumerate(data["images"]):
        source = f"{path}: images[{index}]"
        split = require(image, "split", source, str)
        if splits is not None and split not in splits:
            continue
        relative = f"{require(image, 'filepath', source, str)}/{require(image, 'filename', source, str)}"
        references = [require(s, "raw", f"{source}.sentences", str).strip()
                      for s in require(image, "sentences", source, list)]
        entries.append({"id": image.get("cocoid", image.get("imgid", index)), "file": relative,
                        "references": references, "split": split})
    return entries


class CocoCaptionsDataset(Dataset):
    """One sample per image: `prompt` as the user turn, one reference caption as the answer.

    Items: `{"id", "images": [image], "messages": [user, assistant], "references": [all captions],
    "image_file"}`. The answer is the first reference, or a random one per access with `random_caption=True`.

    Args:
        captions_json: a COCO captions file or a Karpathy `dataset_coco.json`.
        image_root: folder the image paths are relative to.
        split: Karpathy files only: a split name or a list of names ("train", "restval", "val", "test").
        prompt: the user instruction after the `<image>` marker.
        skip_missing: skip (and count in `num_skipped`, with a warning) images missing on disk instead of raising.
    """

    def __init__(self, captions_json, image_root, split=None, prompt: str = SHORT_CAPTION_PROMPT,
                 random_caption: bool = False, skip_missing: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        data = read_json(captions_json)
        if not isinstance(data, dict) or "images" not in data:
            raise DataFormatError(f"{captions_json}: expected a JSON object with an 'images' list")
        karpathy = "annotations" not in data
        if not karpathy and split is not None:
            raise ValueError(f"{captions_json}: split={split!r} applies to Karpathy files only; "
                             "COCO caption files hold one split each")
        splits = {split} if isinstance(split, str) else None if split is None else set(split)
        entries = _karpathy_captions(data, captions_json, splits) if karpathy else _coco_captions(data, captions_json)
        for entry in entries:
            if not entry["references"]:
                raise DataFormatError(f"{captions_json}: image {entry['id']!r} ({entry['file']}) has no caption")
            entry["path"] = resolve_image_path(image_root, entry["file"])
        self.entries, self.num_skipped = check_images_exist(entries, lambda e: [e["path"]], skip_missing,
                                                            captions_json)
        self.prompt, self.random_caption, self.max_pixels = prompt, random_caption, max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def text_lengths(self) -> list[int]:
        """Characters of each sample's text (prompt + mean reference), for length-grouped batches."""
        return [len(self.prompt) + round(sum(map(len, e["references"])) / len(e["references"])) for e in self.entries]

    def __getitem__(self, index: int) -> dict:
        return self.draw_item(index, None)

    def draw_item(self, index: int, rng=None) -> dict:
        """The sample, its random reference caption drawn with `rng` (a numpy Generator; training passes one
        seeded by the sample's draw) or, without one, with Python's `random`."""
        entry = self.entries[index]
        references = entry["references"]
        if not self.random_caption:
            answer = references[0]
        else:
            answer = references[int(rng.integers(len(references)))] if rng is not None else random.choice(references)
        return {
            "id": entry["id"],
            "images": [load_image(entry["path"], self.max_pixels)],
            "messages": single_turn(self.prompt, answer),
            "references": list(entry["references"]),
            "image_file": entry["file"],
        }

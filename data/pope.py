"""POPE question files: reading, writing, generating them from COCO instances, and a dataset for evaluation.

The official files (`AoiDragon/POPE: output/coco/coco_pope_*.json`) are JSON Lines with the fields
`question_id`, `image`, `text` ("Is there a/an {object} in the image?") and `label` ("yes"/"no").
`generate_pope` follows the official protocol (see `shared/reference/evaluation.md` §1.2), seeded.
"""

import random
from collections import Counter

from torch.utils.data import Dataset

from .images import DEFAULT_MAX_PIXELS, check_images_exist, load_image, resolve_image_path
from .jsonl import DataFormatError, read_json, read_jsonl, require, write_jsonl
from .messages import single_turn
from .shapes import article

POPE_STRATEGIES = ("random", "popular", "adversarial")
POPE_FIELDS = ("question_id", "image", "text", "label")


def pope_question(obj: str) -> str:
    """The POPE question for an object, with "a"/"an" chosen by its first letter as in the official files."""
    return f"Is there {article(obj)} {obj} in the image?"


def read_pope_file(path) -> list[dict]:
    """Read a POPE question file (JSON Lines, LF or CRLF); every record keeps all of its fields.

    Raises `DataFormatError` naming the file and line for a missing field or a label other than yes/no."""
    records = read_jsonl(path)
    for line, record in enumerate(records, start=1):
        source = f"{path}: question {line}"
        require(record, "question_id", source, int)
        require(record, "image", source, str)
        require(record, "text", source, str)
        if require(record, "label", source, str) not in ("yes", "no"):
            raise DataFormatError(f"{source}: label must be 'yes' or 'no', got {record['label']!r}")
    return records


def write_pope_file(path, questions, line_ending: str = "\n"):
    """Write questions as the official files do: one `json.dumps` object per line."""
    write_jsonl(path, questions, line_ending)


def image_objects(instances) -> list[tuple[str, list[str]]]:
    """`(file_name, objects)` per image of a COCO instances file (a path or the loaded dict), images in id
    order; objects are the distinct category names in annotation order."""
    if not isinstance(instances, dict):
        path = instances
        instances = read_json(path)
    else:
        path = "instances"
    for key in ("images", "annotations", "categories"):
        require(instances, key, str(path), list)
    names = {category["id"]: category["name"] for category in instances["categories"]}
    objects = {image["id"]: [] for image in instances["images"]}
    for index, annotation in enumerate(instances["annotations"]):
        image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
        if image_id not in objects or category_id not in names:
            raise DataFormatError(f"{path}: annotation {index} refers to unknown image {image_id!r} "
                                  f"or category {category_id!r}")
        if names[category_id] not in objects[image_id]:
            objects[image_id].append(names[category_id])
    files = {image["id"]: image["file_name"] for image in instances["images"]}
    return [(files[image_id], objects[image_id]) for image_id in sorted(objects)]


def _ranked(counter: Counter) -> list[str]:
    """Keys by decreasing count; ties keep first-seen order (as Python's stable sort does in POPE)."""
    return [name for name, _ in sorted(counter.items(), key=lambda item: -item[1])]


def generate_pope(instances, strategy: str, num_images: int | None = 500, num_per_image: int = 3,
                  seed: int = 0, vocabulary: list[str] | None = None) -> list[dict]:
    """POPE questions for the images of a COCO instances file (path or dict).

    Images with at least `num_per_image` objects are eligible; `num_images` of them are sampled (all when
    None or when fewer exist) and kept in id order. Per image, the first `num_per_image` objects give "yes"
    questions, each followed by one "no" question about an object that is not in the image and not asked
    yet, chosen by `strategy`:
      - random: uniformly among `vocabulary` (default: the objects of the sampled images);
      - popular: the most frequent object over the sampled images;
      - adversarial: the object co-occurring most often with the current "yes" object;
    popular and adversarial fall back to random when their list is exhausted.
    """
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; choose from {POPE_STRATEGIES}")
    rng = random.Random(seed)
    eligible = [(name, objects) for name, objects in image_objects(instances) if len(objects) >= num_per_image]
    if num_images is not None and num_images < len(eligible):
        chosen = sorted(rng.sample(range(len(eligible)), num_images))
        eligible = [eligible[i] for i in chosen]

    frequency, co_occurrence = Counter(), {}
    for _, objects in eligible:
        frequency.update(objects)
        for obj in objects:
            co_occurrence.setdefault(obj, Counter()).update(other for other in objects if other != obj)
    vocabulary = list(frequency) if vocabulary is None else list(vocabulary)
    popular = _ranked(frequency)
    adversarial = {obj: _ranked(counter) for obj, counter in co_occurrence.items()}

    questions = []
    for image, objects in eligible:
        asked = []
        for positive in objects[:num_per_image]:
            asked.append(positive)
            questions.append({"question_id": len(questions) + 1, "image": image, "text": pope_question(positive),
                              "label": "yes"})
            allowed = [obj for obj in vocabulary if obj not in asked and obj not in objects]
            if not allowed:
                raise ValueError(f"POPE: no negative object left for image {image}: the vocabulary has only "
                                 f"{len(vocabulary)} objects")
            ranking = popular if strategy == "popular" else adversarial[positive] if strategy == "adversarial" else []
            negative = next((obj for obj in ranking if obj in allowed), None)
            if negative is None:
                negative = allowed[rng.randrange(len(allowed))]
            asked.append(negative)
            questions.append({"question_id": len(questions) + 1, "image": image, "text": pope_question(negative),
                              "label": "no"})
    return questions


class PopeDataset(Dataset):
    """POPE questions as evaluation samples.

    Each item: `{"id": question_id, "images": [image], "messages": [user turn "<image>\\n{text}{prompt_suffix}"],
    "label": "yes"|"no", "question": text, "image_file": name}`. Missing images raise at construction, or
    with `skip_missing=True` are skipped and counted in `self.num_skipped` (and a warning).
    """

    def __init__(self, pope_file, image_root, prompt_suffix: str = "", skip_missing: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.prompt_suffix = prompt_suffix
        self.max_pixels = max_pixels
        items = [(record, resolve_image_path(image_root, record["image"])) for record in read_pope_file(pope_file)]
        self.items, self.num_skipped = check_images_exist(items, lambda item: [item[1]], skip_missing, pope_file)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        record, path = self.items[index]
        return {
            "id": record["question_id"],
            "images": [load_image(path, self.max_pixels)],
            "messages": single_turn(record["text"] + self.prompt_suffix),
            "label": record["label"],
            "question": record["text"],
            "image_file": record["image"],
        }

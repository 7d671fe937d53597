"""Synthetic scenes with a controllable hallucination bias, written as a COCO-style dataset.

Each image shows a few coloured shapes on a muted background. Which shapes appear together is set by a
`SceneConfig`: category frequencies and co-occurrence rules such as "given a moon, a star appears in 90% of
images". A model trained on such scenes learns the prior and tends to report a star next to every moon:
a small, fully controlled lab for object hallucination (POPE's adversarial split probes exactly that).

Every image draws four independent random streams from `(seed, image id)`: content (which objects,
colours, sizes), layout (positions), rendering (background pixels) and text (captions, questions), so
the same seed gives the same bytes, images can be produced in any order, and `render=False` gives the very
same annotations without pixels.
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .jsonl import write_json, write_jsonl
from .pope import POPE_STRATEGIES, generate_pope
from .scene_folder import ScenesFolder, scene_image_name
from .scene_text import captions, llava_records
from .shapes import CATEGORIES, COLOURS, chair_vocabulary
from .typed_yaml import load_dataclass

SIZE_RADIUS = {"small": 0.11, "large": 0.18}  # shape radius as a fraction of the image side
BACKGROUND_RANGE = (78, 202)  # background channels stay here; every object colour has a channel outside it
CONTENT, LAYOUT, RENDER, TEXT = 0, 1, 2, 3  # random streams of one image


def _default_weights():
    return {"circle": 3.0, "square": 3.0, "triangle": 3.0}


def _default_cooccurrence():
    return {"moon": {"star": 0.9}, "heart": {"ring": 0.85}, "flower": {"drop": 0.8}}


# Each shape's typical colour, as bananas are yellow: the three co-occurring pairs share theirs, so
# telling a moon from a star takes the shape, while every other shape is easy to spot by colour.
TYPICAL_COLOURS = {"moon": "yellow", "star": "yellow", "heart": "red", "ring": "red", "flower": "blue",
                   "drop": "blue", "circle": "orange", "square": "purple", "triangle": "green", "cross": "white",
                   "diamond": "black", "hexagon": "pink", "pentagon": "cyan", "arrow": "brown", "bolt": "lime",
                   "hourglass": "navy"}


def typical_colour_weights(share: float = 0.8) -> dict[str, dict[str, float]]:
    """`SceneConfig.colour_weights` giving each shape its typical colour `share` of the time (the other
    colours, weight 1 each, share the rest)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"typical colour share must lie in [0, 1), got {share}")
    weight = round(share / (1.0 - share) * (len(COLOURS) - 1), 6)
    return {category: {colour: weight} for category, colour in TYPICAL_COLOURS.items()}


@dataclass
class SceneConfig:
    """What the scene generator draws, including its biases.

    Args:
        image_size: side of the square images in pixels.
        categories: the shape categories in use (default: all 16 of `data.shapes.CATEGORIES`).
        min_primary, max_primary: how many categories are drawn independently per image (uniform in range).
        category_weights: relative frequency of each category in that draw (missing ones weigh 1).
        cooccurrence: `{trigger: {partner: rate}}`: when `trigger` was drawn, `partner` is present with
            probability `rate` exactly (added if missing, removed otherwise). A partner belongs to one rule
            only and is never a trigger, so every stated rate holds exactly.
        eval_cooccurrence: rates for the same rules in every split but train (None: the training rates).
            Lower rates put bias-conflicting images (a trigger without its partner) into val and test, the
            images on which POPE's adversarial split asks about the missing partner.
        multi_instance_prob: chance that a present category gets 2..max_instances instances (for counting).
        max_objects: cap on instances per image (extra instances are dropped, never categories).
        colour_weights: `{category: {colour: weight}}`, relative to weight 1 for the other colours (default:
            each shape's typical colour, `TYPICAL_COLOURS`, 80% of the time).
        large_prob: chance that an object is large rather than small.
        opacity: `{category: alpha}`: that category is drawn blended over the background with weight `alpha`
            in (0, 1] (missing ones: 1, opaque). A faint shape is seen only partly by a small model, as small or
            low-contrast objects in photos are, so where its evidence is weak the model falls back on the
            co-occurrence prior: the case that decode-time hallucination mitigation is meant for.
        max_occlusion: largest fraction of an object's box that later objects' boxes may cover.
        backgrounds: relative frequency of solid, gradient and noise backgrounds.
        splits: split name -> fraction of the images (in id order).
        captions_per_image: reference captions per image.
        pope_per_image: "yes" (and "no") POPE questions per image; images with fewer objects are not asked.
        pope_images: POPE images per split (None: every eligible image).
        image_format: "png" (lossless, exact colours) or "jpg".
    """

    image_size: int = 64
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))
    min_primary: int = 1
    max_primary: int = 3
    category_weights: dict[str, float] = field(default_factory=_default_weights)
    cooccurrence: dict[str, dict[str, float]] = field(default_factory=_default_cooccurrence)
    eval_cooccurrence: dict[str, dict[str, float]] | None = None
    multi_instance_prob: float = 0.15
    max_instances: int = 3
    max_objects: int = 6
    colour_weights: dict[str, dict[str, float]] = field(default_factory=typical_colour_weights)
    large_prob: float = 0.5
    opacity: dict[str, float] = field(default_factory=dict)
    max_occlusion: float = 0.25
    backgrounds: dict[str, float] = field(default_factory=lambda: {"solid": 1.0, "gradient": 1.0, "noise": 1.0})
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    captions_per_image: int = 5
    pope_per_image: int = 3
    pope_images: int | None = None
    image_format: str = "png"

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Refuse inconsistent settings with a message naming the field."""
        def known(name, where):
            if name not in self.categories:
                raise ValueError(f"SceneConfig.{where}: unknown category {name!r} "
                                 f"(known: {', '.join(self.categories)})")

        for name in self.categories:
            if name not in CATEGORIES:
                raise ValueError(f"SceneConfig.categories: unknown shape {name!r} (known: {', '.join(CATEGORIES)})")
        if len(set(self.categories)) != len(self.categories) or not self.categories:
            raise ValueError("SceneConfig.categories must be a non-empty list without repeats")
        if self.image_size < 24:
            raise ValueError(f"SceneConfig.image_size={self.image_size}: shapes are not recognisable below 24 px")
        if not 1 <= self.min_primary <= self.max_primary <= len(self.categories):
            raise ValueError("SceneConfig needs 1 <= min_primary <= max_primary <= number of categories")
        for name, weight in self.category_weights.items():
            known(name, "category_weights")
            if weight < 0:
                raise ValueError(f"SceneConfig.category_weights[{name!r}] is negative")
        partners_seen = {}
        for trigger, partners in self.cooccurrence.items():
            known(trigger, "cooccurrence")
            for partner, rate in partners.items():
                known(partner, f"cooccurrence[{trigger!r}]")
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"SceneConfig.cooccurrence[{trigger!r}][{partner!r}]={rate} is not a probability")
                if partner == trigger or partner in self.cooccurrence:
                    raise ValueError(f"SceneConfig.cooccurrence: {partner!r} is both a trigger and a partner")
                if partner in partners_seen:
                    raise ValueError(f"SceneConfig.cooccurrence: {partner!r} is a partner of both "
                                     f"{partners_seen[partner]!r} and {trigger!r}; the rates would conflict")
                partners_seen[partner] = trigger
        for trigger, partners in (self.eval_cooccurrence or {}).items():
            for partner, rate in partners.items():
                if partner not in self.cooccurrence.get(trigger, {}):
                    raise ValueError(f"SceneConfig.eval_cooccurrence[{trigger!r}][{partner!r}]: not a rule of "
                                     "`cooccurrence` (evaluation splits change the rates of its rules only)")
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"SceneConfig.eval_cooccurrence[{trigger!r}][{partner!r}]={rate} is not a "
                                     "probability")
        most_partners = sum(sorted((len(p) for p in self.cooccurrence.values()), reverse=True)[:self.max_primary])
        if self.max_objects < self.max_primary + most_partners:
            raise ValueError(f"SceneConfig.max_objects={self.max_objects} is below max_primary plus the partners "
                             f"that can be added ({self.max_primary + most_partners})")
        for category, weights in self.colour_weights.items():
            known(category, "colour_weights")
            for colour in weights:
                if colour not in COLOURS:
                    raise ValueError(f"SceneConfig.colour_weights[{category!r}]: unknown colour {colour!r}")
        for kind in self.backgrounds:
            if kind not in ("solid", "gradient", "noise"):
                raise ValueError(f"SceneConfig.backgrounds: unknown kind {kind!r} (solid, gradient, noise)")
        if not math.isclose(sum(self.splits.values()), 1.0, abs_tol=1e-6) or min(self.splits.values()) < 0:
            raise ValueError(f"SceneConfig.splits fractions must be >= 0 and sum to 1, got {self.splits}")
        for category, alpha in self.opacity.items():
            known(category, "opacity")
            if not 0.0 < alpha <= 1.0:
                raise ValueError(f"SceneConfig.opacity[{category!r}]={alpha} must lie in (0, 1]")
        for name in ("multi_instance_prob", "large_prob", "max_occlusion"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SceneConfig.{name} must lie in [0, 1]")
        if self.max_objects >= 100 or self.captions_per_image >= 100:
            raise ValueError("SceneConfig: max_objects and captions_per_image must stay below 100 (annotation ids)")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"SceneConfig.image_format must be 'png' or 'jpg', got {self.image_format!r}")

    @classmethod
    def from_file(cls, path) -> "SceneConfig":
        """Load from YAML or JSON; unknown keys and ill-typed values are refused with the file name."""
        return load_dataclass(cls, path)


@dataclass
class SceneObject:
    """One shape instance: what it is, and where (pixel outline and COCO box)."""

    category: str
    colour: str
    size: str
    opacity: float = 1.0
    centre: tuple[float, float] = (0.0, 0.0)
    outline: list[tuple[float, float]] = field(default_factory=list)
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # x, y, width, height


@dataclass
class Scene:
    """One generated image: its id, side, background kind and objects in drawing order."""

    image_id: int
    image_size: int
    background: str
    objects: list[SceneObject]


def _weighted_choice(rng, names, weights: dict, default: float = 1.0):
    p = np.array([weights.get(name, default) for name in names], dtype=np.float64)
    return names[rng.choice(len(names), p=p / p.sum())]


def cooccurrence_rates(config: SceneConfig, split: str) -> dict[str, dict[str, float]]:
    """The co-occurrence rules of a split: the training rates, with `eval_cooccurrence` outside train."""
    if split == "train" or not config.eval_cooccurrence:
        return config.cooccurrence
    return {trigger: {partner: config.eval_cooccurrence.get(trigger, {}).get(partner, rate)
                      for partner, rate in partners.items()} for trigger, partners in config.cooccurrence.items()}


def sample_categories(config: SceneConfig, rng, split: str = "train") -> list[str]:
    """The categories present in one image: an independent weighted draw, then the split's co-occurrence rules."""
    names = list(config.categories)
    weights = np.array([config.category_weights.get(name, 1.0) for name in names], dtype=np.float64)
    count = int(rng.integers(config.min_primary, config.max_primary + 1))
    count = min(count, int(np.count_nonzero(weights)))
    drawn = [names[i] for i in rng.choice(len(names), size=count, replace=False, p=weights / weights.sum())]
    present = list(drawn)
    for trigger, partners in cooccurrence_rates(config, split).items():
        if trigger not in drawn:
            continue
        for partner, rate in partners.items():
            if rng.random() < rate:
                if partner not in present:
                    present.append(partner)
            elif partner in present:
                present.remove(partner)
    return present


def sample_objects(config: SceneConfig, rng, split: str = "train") -> list[SceneObject]:
    """Categories, instance counts, colours and sizes of one image (no positions yet)."""
    categories = sample_categories(config, rng, split)
    counts = [int(rng.integers(2, config.max_instances + 1)) if rng.random() < config.multi_instance_prob else 1
              for _ in categories]
    while sum(counts) > config.max_objects:  # drop extra instances, never a whole category
        counts[max(range(len(counts)), key=lambda i: counts[i])] -= 1
    colours = list(COLOURS)
    objects = []
    for category, count in zip(categories, counts):
        for _ in range(count):
            colour = _weighted_choice(rng, colours, config.colour_weights.get(category, {}))
            size = "large" if rng.random() < config.large_prob else "small"
            objects.append(SceneObject(category, colour, size, config.opacity.get(category, 1.0)))
    return objects


def _box_overlap(a, b) -> float:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)


def _try_layout(objects: list[SceneObject], image_size: int, max_occlusion: float, rng, tries_per_object: int) -> bool:
    """One attempt at placing all objects in order; False when one of them finds no free spot."""
    boxes, covered = [], []  # covered[j]: fraction of box j under later objects' boxes
    for obj in objects:
        radius = SIZE_RADIUS[obj.size] * image_size
        unit = CATEGORIES[obj.category].outline
        for _ in range(tries_per_object):
            cx, cy = rng.uniform(radius, image_size - radius, size=2)
            outline = [(cx + x * radius, cy + y * radius) for x, y in unit]
            xs, ys = [p[0] for p in outline], [p[1] for p in outline]
            box = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
            extra = [_box_overlap(box, other) / (other[2] * other[3]) for other in boxes]
            if all(c + e <= max_occlusion for c, e in zip(covered, extra)):
                break
        else:
            return False
        covered = [c + e for c, e in zip(covered, extra)] + [0.0]
        boxes.append(box)
        obj.centre, obj.outline, obj.bbox = (float(cx), float(cy)), outline, box
    return True


def place_objects(objects: list[SceneObject], image_size: int, max_occlusion: float, rng,
                  tries_per_object: int = 60, restarts: int = 30):
    """Give each object a position inside the image such that later (drawn on top) objects cover at most
    `max_occlusion` of any earlier object's box. Sizes are turned to "small" after half the restarts, so
    crowded images still fit; a layout that never fits raises `RuntimeError`."""
    for restart in range(restarts):
        if restart == restarts // 2:
            for obj in objects:
                obj.size = "small"
        if _try_layout(objects, image_size, max_occlusion, rng, tries_per_object):
            return
    raise RuntimeError(f"could not place {len(objects)} objects in a {image_size}px image with "
                       f"max_occlusion={max_occlusion}; use fewer objects or a larger image")


def _background(kind: str, size: int, rng) -> np.ndarray:
    low, high = BACKGROUND_RANGE
    base = rng.integers(low + 15, high - 15) + rng.integers(-12, 13, size=3)
    if kind == "solid":
        pixels = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    elif kind == "gradient":
        other = rng.integers(low + 15, high - 15) + rng.integers(-12, 13, size=3)
        ramp = np.linspace(0.0, 1.0, size)
        ramp = ramp[None, :] if rng.random() < 0.5 else ramp[:, None]  # horizontal or vertical
        pixels = base + (other - base) * np.broadcast_to(ramp, (size, size))[..., None]
    else:
        pixels = base + rng.normal(0.0, 6.0, size=(size, size, 3))
    return np.clip(np.round(pixels), low, high).astype(np.uint8)


def render_scene(scene: Scene, rng) -> Image.Image:
    """Draw the background, then the objects in order (later ones on top, faint ones blended)."""
    image = Image.fromarray(_background(scene.background, scene.image_size, rng), mode="RGB")
    # Opaque shapes keep PIL's plain fill (its RGBA blending rasterises a few edge pixels differently, and
    # datasets made before `opacity` existed keep their bytes).
    opaque, blended = ImageDraw.Draw(image), ImageDraw.Draw(image, "RGBA")
    for obj in scene.objects:
        if obj.opacity == 1.0:
            opaque.polygon(obj.outline, fill=COLOURS[obj.colour])
        else:
            blended.polygon(obj.outline, fill=(*COLOURS[obj.colour], round(255 * obj.opacity)))
    return image


def make_scene(image_id: int, seed: int, config: SceneConfig, split: str = "train") -> Scene:
    """The content and layout of image `image_id` in `split` (independent of every other image)."""
    content = np.random.default_rng([seed, image_id, CONTENT])
    objects = sample_objects(config, content, split)
    background = _weighted_choice(content, list(config.backgrounds), config.backgrounds)
    place_objects(objects, config.image_size, config.max_occlusion, np.random.default_rng([seed, image_id, LAYOUT]))
    return Scene(image_id, config.image_size, background, objects)


def _polygon_area(points) -> float:
    """Shoelace area (the ring's slit polygon gives the outer minus the inner disc)."""
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)


def _coco_annotation(annotation_id: int, image_id: int, obj: SceneObject) -> dict:
    return {
        "id": annotation_id, "image_id": image_id, "category_id": CATEGORIES[obj.category].id,
        "bbox": [round(v, 2) for v in obj.bbox], "area": round(_polygon_area(obj.outline), 2),
        "segmentation": [np.round(np.asarray(obj.outline), 2).ravel().tolist()], "iscrowd": 0,
        "colour": obj.colour, "size": obj.size,
    }


def _split_ranges(num_images: int, splits: dict) -> dict[str, range]:
    """Consecutive image-id ranges (ids start at 1) with sizes rounded from the split fractions."""
    ranges, start, cumulative = {}, 1, 0.0
    for name, fraction in splits.items():
        cumulative += fraction
        end = 1 + round(cumulative * num_images)
        ranges[name] = range(start, end)
        start = end
    return ranges


def _empty_splits(num_images: int, splits: dict) -> list[str]:
    """The splits given a share of the images that `num_images` would leave without any."""
    return [split for split, ids in _split_ranges(num_images, splits).items() if not ids and splits[split] > 0]


def generate_scenes(out_dir, num_images: int, seed: int = 0, config: SceneConfig | None = None,
                    render: bool = True) -> dict:
    """Generate a synthetic dataset in `out_dir`; returns the paths of what was written.

    The layout is `data.scene_folder.ScenesFolder`'s; the COCO instances carry each object's colour and size as
    extra fields. With `render=False` no image is drawn (the annotations are the same)."""
    config = config or SceneConfig()
    empty = _empty_splits(num_images, config.splits)
    if empty:
        enough = next(n for n in range(1, 1_000_000) if not _empty_splits(n, config.splits))
        raise ValueError(f"{num_images} images leave the {', '.join(empty)} split(s) empty (split fractions "
                         f"{config.splits}): give at least {enough} images")
    folder = ScenesFolder(out_dir)
    folder.root.mkdir(parents=True, exist_ok=True)
    categories_json = [{"id": CATEGORIES[name].id, "name": name, "supercategory": CATEGORIES[name].supercategory}
                       for name in config.categories]
    info = {"description": "vlm-suite synthetic scenes", "seed": seed, "version": "1.0"}
    paths = {"images": {}, "instances": {}, "captions": {}, "conversations": {}, "pope": {}}
    for split, ids in _split_ranges(num_images, config.splits).items():
        image_dir = folder.images(split)
        if render:
            image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations, caption_records, conversations = [], [], [], []
        for image_id in ids:
            scene = make_scene(image_id, seed, config, split)
            file_name = scene_image_name(image_id, config.image_format)
            if render:
                render_scene(scene, np.random.default_rng([seed, image_id, RENDER])).save(image_dir / file_name, **(
                    {"compress_level": 6} if config.image_format == "png" else {"quality": 95}))
            images.append({"id": image_id, "file_name": file_name, "width": config.image_size,
                           "height": config.image_size, "background": scene.background})
            # Ids of annotations and captions: image id * 100 + index, unique over all splits.
            for index, obj in enumerate(scene.objects, start=1):
                annotations.append(_coco_annotation(100 * image_id + index, image_id, obj))
            text_rng = np.random.default_rng([seed, image_id, TEXT])
            for index, caption in enumerate(captions(scene, config.captions_per_image, text_rng), start=1):
                caption_records.append({"id": 100 * image_id + index, "image_id": image_id, "caption": caption})
            conversations += llava_records(scene, file_name, config.categories, text_rng)
        instances = {"info": info, "licenses": [], "images": images, "annotations": annotations,
                     "categories": categories_json}
        paths["images"][split] = image_dir
        paths["instances"][split] = folder.instances(split)
        paths["captions"][split] = folder.captions(split)
        paths["conversations"][split] = folder.conversations(split)
        write_json(paths["instances"][split], instances)
        write_json(paths["captions"][split], {"info": info, "licenses": [], "images": images,
                                              "annotations": caption_records})
        write_json(paths["conversations"][split], conversations)
        paths["pope"][split] = {}
        for strategy in POPE_STRATEGIES:
            questions = generate_pope(instances, strategy, num_images=config.pope_images,
                                      num_per_image=config.pope_per_image, seed=seed, vocabulary=config.categories)
            paths["pope"][split][strategy] = folder.pope(split, strategy)
            write_jsonl(paths["pope"][split][strategy], questions)
    paths["chair_vocab"] = folder.chair_vocabulary
    paths["chair_vocab"].write_text(json.dumps(chair_vocabulary(config.categories), indent=1))
    paths["config"] = folder.config_file
    paths["config"].write_text(json.dumps(asdict(config), indent=1))
    return paths

"""The vocabulary of the synthetic scenes: shape categories (as polygons), colours and their words.

Each shape is one simple polygon in unit coordinates (x to the right, y downwards, inside [-1, 1]²), so
the same outline is both what gets drawn and the COCO segmentation polygon. The ring is drawn as one polygon
with a hair-thin slit joining its outer and inner circles, which keeps its hole see-through.
"""

import math
from dataclasses import dataclass


def _regular(sides: int, radius: float = 1.0, rotation: float = -math.pi / 2) -> list[tuple[float, float]]:
    angles = [rotation + 2 * math.pi * k / sides for k in range(sides)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in angles]


def _star() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.45
        angle = -math.pi / 2 + math.pi * k / 5
        points.append((radius * math.cos(angle), radius * math.sin(angle) + 0.08))
    return points


def _moon() -> list[tuple[float, float]]:
    # Outer arc of the unit circle through the left side, back along the arc of a circle through the two
    # tips (0.5, ±0.866) whose leftmost point is x = -0.35: a crescent opening to the right.
    outer = [(math.cos(math.radians(a)), -math.sin(math.radians(a))) for a in range(60, 301, 10)]
    centre = 0.8775 / 1.7
    radius = centre + 0.35
    tip = math.degrees(math.atan2(math.sqrt(0.75), 0.5 - centre))
    inner = []
    for step in range(13):
        angle = math.radians(360 - tip - (360 - 2 * tip) * step / 12)
        inner.append((centre + radius * math.cos(angle), -radius * math.sin(angle)))
    return outer + inner


def _heart() -> list[tuple[float, float]]:
    points = []
    for k in range(36):
        t = 2 * math.pi * k / 36
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17.0, -(y + 2.5) / 15.0))
    return points


def _ring() -> list[tuple[float, float]]:
    outer = [(math.cos(2 * math.pi * k / 32 + 0.01), math.sin(2 * math.pi * k / 32 + 0.01)) for k in range(33)]
    inner = [(0.55 * math.cos(-2 * math.pi * k / 32 + 0.01), 0.55 * math.sin(-2 * math.pi * k / 32 + 0.01))
             for k in range(33)]
    return outer + inner


def _drop() -> list[tuple[float, float]]:
    points = []
    for k in range(32):
        t = 2 * math.pi * k / 32
        points.append((0.8 * math.sin(t) * math.sin(t / 2), -math.cos(t)))
    return points


def _flower() -> list[tuple[float, float]]:
    points = []
    for k in range(60):
        angle = 2 * math.pi * k / 60
        radius = 0.68 + 0.32 * math.cos(5 * angle)
        points.append((radius * math.cos(angle - math.pi / 2), radius * math.sin(angle - math.pi / 2)))
    return points


@dataclass(frozen=True)
class Category:
    """A shape category: its COCO id, name, supercategory, plural, CHAIR synonyms and unit outline."""

    id: int
    name: str
    supercategory: str
    plural: str
    synonyms: tuple[str, ...]
    outline: tuple[tuple[float, float], ...]


_DEFINITIONS = [
    ("circle", "curved", "circles", ("disc", "disk"), _regular(32)),
    ("square", "polygon", "squares", (), [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]),
    ("triangle", "polygon", "triangles", (), [(0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)]),
    ("star", "symbol", "stars", (), _star()),
    ("moon", "curved", "moons", ("crescent",), _moon()),
    ("heart", "curved", "hearts", (), _heart()),
    ("cross", "symbol", "crosses", ("plus sign",),
     [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1), (-0.3, 0.3),
      (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]),
    ("diamond", "polygon", "diamonds", ("rhombus",), [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]),
    ("hexagon", "polygon", "hexagons", (), _regular(6, rotation=0.0)),
    ("pentagon", "polygon", "pentagons", (), [(x, y + 0.1) for x, y in _regular(5)]),
    ("ring", "curved", "rings", ("annulus",), _ring()),
    ("arrow", "symbol", "arrows", (),
     [(-1, -0.25), (0.15, -0.25), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.25), (-1, 0.25)]),
    ("bolt", "symbol", "bolts", ("lightning bolt", "lightning"),
     [(0.2, -1), (0.7, -1), (0.25, -0.15), (0.65, -0.15), (-0.45, 1), (-0.1, 0.1), (-0.55, 0.1)]),
    ("drop", "curved", "drops", ("droplet", "teardrop"), _drop()),
    ("flower", "symbol", "flowers", ("blossom",), _flower()),
    ("hourglass", "symbol", "hourglasses", (),
     [(-0.75, -1), (0.75, -1), (0.12, 0), (0.75, 1), (-0.75, 1), (-0.12, 0)]),
]

CATEGORIES: dict[str, Category] = {
    name: Category(index + 1, name, supercategory, plural, synonyms, tuple(outline))
    for index, (name, supercategory, plural, synonyms, outline) in enumerate(_DEFINITIONS)
}

# Saturated object colours; backgrounds are drawn from muted greys so every object stands out.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 20),
    "green": (20, 160, 50),
    "blue": (30, 80, 230),
    "purple": (140, 40, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "pink": (255, 110, 190),
    "cyan": (0, 210, 230),
    "brown": (130, 70, 20),
    "lime": (160, 250, 40),
    "navy": (20, 20, 130),
}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def article(word: str) -> str:
    """'a' or 'an' for `word`: by its first letter, as the POPE question files do, plus the silent h of "hour"."""
    return "an" if word[:1].lower() in "aeiou" or word.lower().startswith("hour") else "a"


def chair_vocabulary(categories) -> dict:
    """The CHAIR word lists for `categories`, in the layout of the shared `chair_synonyms.json`.

    `inverse_synonym_dict` maps each surface form (singular) to its category; `double_word_dict` maps
    two-word forms to the compound kept as one token (itself a key of `inverse_synonym_dict`), as CHAIR
    does. Plurals are left to the evaluator.
    """
    synonyms, inverse, double = {}, {}, {}
    for name in categories:
        category = CATEGORIES[name]
        synonyms[name] = [name, *category.synonyms]
        for form in synonyms[name]:
            inverse[form] = name
            if " " in form:
                double[form] = form  # CHAIR joins the two words into one token before the lookup
    return {"categories": list(categories), "synonyms": synonyms,
            "inverse_synonym_dict": inverse, "double_word_dict": double}

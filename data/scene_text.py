"""Words for synthetic scenes: captions from a fixed set of templates, and LLaVA-style conversations.

Everything here reads a scene's objects (`category`, `colour`, `size`, `centre`) and the image size, and
mentions only objects that are present, so CHAIR finds no hallucination in the reference captions.
"""

from collections import Counter

from vlm.processing import IMAGE_MARKER
from vlm.prompts import DETAIL_PROMPT

from .shapes import CATEGORIES, NUMBER_WORDS, article

BACKGROUND_WORDS = {"solid": "plain", "gradient": "shaded", "noise": "grainy"}


def _number(count: int) -> str:
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def _noun(category: str, count: int) -> str:
    return category if count == 1 else CATEGORIES[category].plural


def _counted(count: int, words: str) -> str:
    """'a red star', 'an orange moon', 'two red stars' (`words` already in the right number)."""
    return f"{article(words)} {words}" if count == 1 else f"{_number(count)} {words}"


def join_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _grouped(objects, with_size: bool) -> list[str]:
    """Phrases for the objects grouped by (size, colour, category), in order of first appearance."""
    groups = Counter((o.size if with_size else "", o.colour, o.category) for o in objects)
    phrases = []
    for (size, colour, category), count in groups.items():
        words = " ".join(word for word in (size, colour, _noun(category, count)) if word)
        phrases.append(_counted(count, words))
    return phrases


def position_phrase(centre, image_size: int) -> str:
    """Where a point lies on a 3x3 grid: 'at the top left', 'on the right', 'in the centre'."""
    column = min(int(3 * centre[0] / image_size), 2)
    row = min(int(3 * centre[1] / image_size), 2)
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[column]
    if vertical and horizontal:
        return f"at the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal}"
    return "in the centre"


def _one(obj) -> str:
    words = f"{obj.colour} {obj.category}"
    return f"{article(words)} {words}"


def _relation(first, second) -> str:
    """'a red star is to the left of a blue moon' from the centres of two objects."""
    dx, dy = second.centre[0] - first.centre[0], second.centre[1] - first.centre[1]
    if abs(dx) >= abs(dy):
        relation = "to the left of" if dx > 0 else "to the right of"
    else:
        relation = "above" if dy > 0 else "below"
    return f"{_one(first)} is {relation} {_one(second)}"


def _counting_sentence(scene) -> str:
    objects = scene.objects
    by_category = Counter(o.category for o in objects)
    parts = [_counted(count, _noun(category, count)) for category, count in by_category.items()]
    verb, noun = ("is", "shape") if len(objects) == 1 else ("are", "shapes")
    return f"There {verb} {_number(len(objects))} {noun}: {join_words(parts)}."


def _positions_sentence(scene) -> str:
    parts = [f"{_one(o)} {position_phrase(o.centre, scene.image_size)}" for o in scene.objects[:3]]
    return _capitalise(join_words(parts)) + "."


def _relation_sentence(scene) -> str:
    objects = scene.objects
    if len(objects) == 1:
        only = objects[0]
        return f"A single {only.colour} {only.category} {position_phrase(only.centre, scene.image_size)}."
    return _capitalise(_relation(objects[0], objects[1])) + "."


def _listing_caption(scene) -> str:
    objects = join_words(_grouped(scene.objects, with_size=True))
    return _capitalise(objects) + f" on a {BACKGROUND_WORDS[scene.background]} background."


def _shows_caption(scene) -> str:
    return "The image shows " + join_words(_grouped(scene.objects, with_size=False)) + "."


CAPTION_TEMPLATES = (_listing_caption, _counting_sentence, _positions_sentence, _relation_sentence, _shows_caption)


def captions(scene, count: int, rng) -> list[str]:
    """`count` captions, each from a different template while there are templates left (order shuffled)."""
    order = list(rng.permutation(len(CAPTION_TEMPLATES)))
    while len(order) < count:
        order += list(rng.permutation(len(CAPTION_TEMPLATES)))
    return [CAPTION_TEMPLATES[index](scene) for index in order[:count]]


def detailed_description(scene) -> str:
    """The long answer to `DETAIL_PROMPT`."""
    background = f"The background is {BACKGROUND_WORDS[scene.background]}."
    return " ".join([_counting_sentence(scene), _positions_sentence(scene), _relation_sentence(scene), background])


EXISTENCE_QUESTIONS = 2  # present shapes asked about per conversation (and as many absent ones)


def existence_question(category: str) -> str:
    """The POPE question template."""
    return f"Is there {article(category)} {category} in the image?"


def question_answers(scene, categories, rng) -> list[tuple[str, str]]:
    """Question/answer pairs about one scene: existence of up to two present shapes and of as many absent
    ones (chosen at random, as POPE's random split does), then up to two of colour, counting and position,
    in random order."""
    counts = Counter(o.category for o in scene.objects)
    present = list(counts)
    absent = [c for c in categories if c not in counts]
    asked = [present[index] for index in rng.permutation(len(present))[:EXISTENCE_QUESTIONS]]
    pairs = [(existence_question(category), "Yes.") for category in asked]
    pairs += [(existence_question(absent[index]), "No.") for index in rng.permutation(len(absent))[:len(asked)]]

    extra = []
    category = present[rng.integers(len(present))]
    colours = {o.colour for o in scene.objects if o.category == category}
    if len(colours) == 1:
        question = f"What colour is the {category}?" if counts[category] == 1 else \
            f"What colour are the {CATEGORIES[category].plural}?"
        extra.append((question, _capitalise(colours.pop()) + "."))
    category = present[rng.integers(len(present))]
    extra.append((f"How many {CATEGORIES[category].plural} are there?", _capitalise(_number(counts[category])) + "."))
    singles = [o for o in scene.objects if counts[o.category] == 1]
    if singles:
        obj = singles[rng.integers(len(singles))]
        where = _capitalise(position_phrase(obj.centre, scene.image_size)) + "."
        extra.append((f"Where is the {obj.category}?", where))
    chosen = rng.permutation(len(extra))[:2]
    pairs += [extra[index] for index in chosen]
    return [pairs[index] for index in rng.permutation(len(pairs))]


def llava_records(scene, file_name: str, categories, rng) -> list[dict]:
    """Two LLaVA conversation records for a scene: a multi-turn question/answer one and a detailed description."""
    turns = []
    for index, (question, answer) in enumerate(question_answers(scene, categories, rng)):
        turns.append({"from": "human", "value": (f"{IMAGE_MARKER}\n" if index == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    detail = [{"from": "human", "value": f"{IMAGE_MARKER}\n{DETAIL_PROMPT}"},
              {"from": "gpt", "value": detailed_description(scene)}]
    stem = f"{scene.image_id:012d}"
    return [{"id": f"{stem}_qa", "image": file_name, "conversations": turns},
            {"id": f"{stem}_detail", "image": file_name, "conversations": detail}]

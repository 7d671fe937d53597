"""Co-occurrence probes against hand-counted cases and against the scenes they are read from."""

import json

from data.scenes import SceneConfig, generate_scenes
from eval.cooccurrence import CooccurrenceProbes

PROBES = CooccurrenceProbes(
    pairs=[("moon", "star"), ("heart", "ring")],
    present={"a.png": {"moon"}, "b.png": {"moon", "star"}, "c.png": {"heart", "circle"}},
)


def test_pope_counts_only_questions_about_a_missing_partner(tmp_path):
    questions = [
        {"question_id": 1, "image": "a.png", "text": "Is there a star in the image?", "label": "no"},  # probe
        {"question_id": 2, "image": "a.png", "text": "Is there a moon in the image?", "label": "yes"},
        {"question_id": 3, "image": "b.png", "text": "Is there a ring in the image?", "label": "no"},  # no heart
        {"question_id": 4, "image": "c.png", "text": "Is there a ring in the image?", "label": "no"},  # probe
        {"question_id": 5, "image": "c.png", "text": "Is there a star in the image?", "label": "no"},  # no moon
    ]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "answer": text}) + "\n" for i, text in
                               enumerate(["Yes, there is.", "Yes.", "Yes.", "No.", "Yes."], start=1)))
    assert PROBES.pope(questions, answers) == {"probes": 2, "claimed": 1, "rate": 0.5}


def test_captions_count_each_missing_partner_once_per_image():
    per_caption = [
        {"ground_truth": ["moon"], "mentioned": ["moon", "star"]},  # star missing and named
        {"ground_truth": ["moon", "star"], "mentioned": ["star"]},  # no probe: the star is there
        {"ground_truth": ["circle", "heart"], "mentioned": ["heart", "star"]},  # ring missing, not named
        {"ground_truth": ["heart", "moon"], "mentioned": ["ring"]},  # two probes, one named
    ]
    assert PROBES.captions(per_caption) == {"probes": 4, "claimed": 2, "rate": 0.5}
    assert PROBES.captions([]) == {"probes": 0, "claimed": 0, "rate": None}


def test_from_scenes_reads_the_rules_and_the_split(tmp_path):
    config = SceneConfig(category_weights={"moon": 30.0}, cooccurrence={"moon": {"star": 0.9}, "heart": {"ring": 0.5}},
                         eval_cooccurrence={"moon": {"star": 0.3}}, splits={"train": 0.5, "test": 0.5})
    paths = generate_scenes(tmp_path, 200, seed=1, config=config, render=False)
    probes = CooccurrenceProbes.from_scenes(tmp_path, "test")
    assert probes.pairs == [("moon", "star"), ("heart", "ring")]
    instances = json.loads(paths["instances"]["test"].read_text())
    names = {category["id"]: category["name"] for category in instances["categories"]}
    files = {image["id"]: image["file_name"] for image in instances["images"]}
    expected = {name: set() for name in files.values()}
    for annotation in instances["annotations"]:
        expected[files[annotation["image_id"]]].add(names[annotation["category_id"]])
    assert probes.present == expected
    moon_without_star = [name for name, objects in probes.present.items() if "moon" in objects and "star" not in objects]
    assert len(moon_without_star) > 20  # the evaluation rate, 0.3, leaves most moons alone

"""The synthetic scene generator: determinism, annotations that agree with the pixels, exact bias rates."""

import contextlib
import io
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

from data.pope import image_objects, read_pope_file
from data.scenes import Scene, SceneConfig, SceneObject, generate_scenes, make_scene, place_objects, render_scene
from data.shapes import CATEGORIES, COLOURS


def files_of(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = files_of(generate_scenes(tmp_path / "a", 40, seed=7)["config"].parent)
    second = files_of(generate_scenes(tmp_path / "b", 40, seed=7)["config"].parent)
    third = files_of(generate_scenes(tmp_path / "c", 40, seed=8)["config"].parent)
    assert len(first) == 40 + 3 * 6 + 2 and first == second
    image = [name for name in first if name.suffix == ".png"][0]
    assert first[image] != third[image] and first[image.parent.parent.parent / "instances_train.json"] != \
        third[image.parent.parent.parent / "instances_train.json"]


def test_render_false_gives_the_same_annotations(tmp_path):
    rendered = files_of(generate_scenes(tmp_path / "a", 30, seed=1)["config"].parent)
    plain = files_of(generate_scenes(tmp_path / "b", 30, seed=1, render=False)["config"].parent)
    assert not (tmp_path / "b" / "images").exists()
    assert plain == {name: data for name, data in rendered.items() if name.suffix != ".png"}


def test_layout_and_splits(tmp_path):
    config = SceneConfig(splits={"train": 0.5, "val": 0.25, "test": 0.25})
    paths = generate_scenes(tmp_path, 20, seed=0, config=config)
    ids = {}
    for split in ("train", "val", "test"):
        instances = json.loads(paths["instances"][split].read_text())
        ids[split] = [image["id"] for image in instances["images"]]
        assert sorted(p.name for p in paths["images"][split].iterdir()) == [f"{i:012d}.png" for i in ids[split]]
    assert ids == {"train": list(range(1, 11)), "val": list(range(11, 16)), "test": list(range(16, 21))}
    assert (tmp_path / "images" / "val" / "000000000011.png").is_file()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' mask decoding under numpy 2
def test_annotations_agree_with_pixels(tmp_path):
    """Rasterise each segmentation with pycocotools (an independent rasteriser): most of the mask must show
    the object's exact colour (occlusion is capped at 25% of the box), and box and area match the polygon."""
    paths = generate_scenes(tmp_path, 60, seed=3, config=SceneConfig(splits={"train": 1.0}))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(paths["instances"]["train"]))
    assert {c["name"] for c in coco.dataset["categories"]} == set(CATEGORIES) and len(CATEGORIES) >= 16
    checked = 0
    for annotation in coco.dataset["annotations"]:
        image = coco.imgs[annotation["image_id"]]
        pixels = np.asarray(Image.open(paths["images"]["train"] / image["file_name"]))
        assert pixels.shape == (image["height"], image["width"], 3)
        mask = coco.annToMask(annotation).astype(bool)
        own_colour = np.all(pixels == COLOURS[annotation["colour"]], axis=-1)
        assert (own_colour & mask).sum() >= 0.5 * mask.sum(), annotation
        x, y, w, h = annotation["bbox"]
        inside = np.zeros_like(mask)
        inside[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
        assert (own_colour & inside).sum() >= 0.5 * mask.sum()
        polygon = np.array(annotation["segmentation"][0]).reshape(-1, 2)
        assert np.allclose([polygon[:, 0].min(), polygon[:, 1].min()], [x, y], atol=0.02)
        assert np.allclose([polygon[:, 0].max(), polygon[:, 1].max()], [x + w, y + h], atol=0.02)
        assert abs(mask.sum() - annotation["area"]) <= 0.2 * annotation["area"]
        assert annotation["iscrowd"] == 0 and annotation["size"] in ("small", "large")
        checked += 1
    assert checked > 60


def test_cooccurrence_rates_are_reached(tmp_path):
    """2,000 images with frequent triggers: P(partner | trigger) within 3% of the configured rate."""
    config = SceneConfig(category_weights={"moon": 30.0, "heart": 30.0},
                         cooccurrence={"moon": {"star": 0.9}, "heart": {"ring": 0.3, "cross": 0.6}},
                         splits={"train": 1.0})
    paths = generate_scenes(tmp_path, 2000, seed=11, config=config, render=False)
    instances = json.loads(paths["instances"]["train"].read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    present = {image["id"]: set() for image in instances["images"]}
    for annotation in instances["annotations"]:
        present[annotation["image_id"]].add(names[annotation["category_id"]])
    for trigger, partner, rate in [("moon", "star", 0.9), ("heart", "ring", 0.3), ("heart", "cross", 0.6)]:
        with_trigger = [objects for objects in present.values() if trigger in objects]
        assert len(with_trigger) > 1000
        observed = sum(partner in objects for objects in with_trigger) / len(with_trigger)
        assert abs(observed - rate) <= 0.03, (trigger, partner, observed)
    # without its trigger a partner is rare: the prior is what a model can learn
    without = [objects for objects in present.values() if "moon" not in objects]
    assert sum("star" in objects for objects in without) / len(without) < 0.25


def test_eval_cooccurrence_changes_only_the_evaluation_splits(tmp_path):
    """Train keeps the training rate; val and test reach the evaluation rate; the train split's bytes do not move."""
    rules = {"category_weights": {"moon": 30.0}, "cooccurrence": {"moon": {"star": 0.9}}}
    splits = {"train": 0.5, "val": 0.25, "test": 0.25}
    biased = generate_scenes(tmp_path / "a", 2000, seed=3, render=False, config=SceneConfig(**rules, splits=splits))
    probed = generate_scenes(tmp_path / "b", 2000, seed=3, render=False,
                             config=SceneConfig(**rules, splits=splits, eval_cooccurrence={"moon": {"star": 0.4}}))
    assert biased["instances"]["train"].read_bytes() == probed["instances"]["train"].read_bytes()

    def star_rate_given_moon(path):
        with_moon = [objects for _, objects in image_objects(path) if "moon" in objects]
        assert len(with_moon) > 300
        return sum("star" in objects for objects in with_moon) / len(with_moon)

    assert abs(star_rate_given_moon(probed["instances"]["train"]) - 0.9) <= 0.04
    for split in ("val", "test"):
        assert abs(star_rate_given_moon(probed["instances"][split]) - 0.4) <= 0.06
        assert abs(star_rate_given_moon(biased["instances"][split]) - 0.9) <= 0.06
    with pytest.raises(ValueError, match=r"eval_cooccurrence\['moon'\]\['ring'\]: not a rule"):
        SceneConfig(**rules, eval_cooccurrence={"moon": {"ring": 0.5}})


def test_text_mentions_only_present_objects(tmp_path):
    paths = generate_scenes(tmp_path, 40, seed=2, config=SceneConfig(splits={"train": 1.0}))
    instances = json.loads(paths["instances"]["train"].read_text())
    names = {c["id"]: c["name"] for c in instances["categories"]}
    present = {image["id"]: Counter() for image in instances["images"]}
    for annotation in instances["annotations"]:
        present[annotation["image_id"]][names[annotation["category_id"]]] += 1
    words = {form: name for name, c in CATEGORIES.items() for form in (name, c.plural)}

    def mentioned(text):
        return {words[w] for w in re.findall(r"[a-z]+", text.lower()) if w in words}

    captions = json.loads(paths["captions"]["train"].read_text())["annotations"]
    assert Counter(c["image_id"] for c in captions) == {i: 5 for i in present}
    for caption in captions:
        assert mentioned(caption["caption"]) <= set(present[caption["image_id"]]), caption
    named = {}
    for caption in captions:
        named.setdefault(caption["image_id"], set()).update(mentioned(caption["caption"]))
    assert all(named[i] == set(present[i]) for i in present)  # together they name every object

    for record in json.loads(paths["conversations"]["train"].read_text()):
        image_id = int(record["id"].split("_")[0])
        assert record["image"] == f"{image_id:012d}.png"
        assert record["conversations"][0]["value"].startswith("<image>\n")
        turns = record["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2]):
            asked = re.fullmatch(r"(?:<image>\n)?Is there an? (\w+) in the image\?", question["value"])
            if asked:
                assert answer["value"] == ("Yes." if asked.group(1) in present[image_id] else "No.")
            count = re.fullmatch(r"(?:<image>\n)?How many (\w+) are there\?", question["value"])
            if count:
                number = ["zero", "one", "two", "three", "four", "five", "six"].index(answer["value"][:-1].lower())
                assert number == present[image_id][words[count.group(1)]]

    for strategy in ("random", "popular", "adversarial"):
        for question in read_pope_file(paths["pope"]["train"][strategy]):
            image_id = int(question["image"][:12])
            obj = re.fullmatch(r"Is there an? (\w+) in the image\?", question["text"]).group(1)
            assert (obj in present[image_id]) == (question["label"] == "yes")


def test_adversarial_pope_asks_for_the_biased_partner(tmp_path):
    """With moon -> star at 0.9, every asked image with a moon but no star gets the question about a star."""
    config = SceneConfig(category_weights={"moon": 30.0}, cooccurrence={"moon": {"star": 0.9}},
                         min_primary=3, splits={"train": 1.0})
    paths = generate_scenes(tmp_path, 200, seed=4, config=config, render=False)
    instances = json.loads(paths["instances"]["train"].read_text())
    star = [c["id"] for c in instances["categories"] if c["name"] == "star"][0]
    with_star = {f"{a['image_id']:012d}.png" for a in instances["annotations"] if a["category_id"] == star}
    questions = read_pope_file(paths["pope"]["train"]["adversarial"])
    probed = {q["image"] for q in questions if q["label"] == "no" and q["text"] == "Is there a star in the image?"}
    moon_without_star = {q["image"] for q in questions
                         if q["text"] == "Is there a moon in the image?" and q["image"] not in with_star}
    assert len(moon_without_star) >= 5 and moon_without_star <= probed


def test_faint_shapes_are_blended_over_the_background():
    """A shape at opacity 0.25 on a solid background: inside it, every pixel is background + 0.25 (colour -
    background), by hand; the config's opacity reaches the objects of its category only."""
    star = SceneObject("star", "yellow", "large", opacity=0.25)
    place_objects([star], 48, 0.25, np.random.default_rng(0))
    pixels = np.asarray(render_scene(Scene(1, 48, "solid", [star]), np.random.default_rng(1))).astype(float)
    mask = Image.new("L", (48, 48))
    ImageDraw.Draw(mask).polygon(star.outline, fill=1)
    mask = np.asarray(mask).astype(bool)
    interior = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    background = pixels[~mask][0]
    assert np.all(pixels[~mask] == background) and interior.sum() > 50
    expected = background + 0.25 * (np.array(COLOURS["yellow"]) - background)
    assert np.abs(pixels[interior] - expected).max() <= 1.0
    config = SceneConfig(opacity={"star": 0.25}, category_weights={"star": 50.0})
    objects = [obj for image_id in range(1, 20) for obj in make_scene(image_id, 0, config).objects]
    assert {obj.opacity for obj in objects if obj.category == "star"} == {0.25}
    assert {obj.opacity for obj in objects if obj.category != "star"} == {1.0}
    with pytest.raises(ValueError, match=r"opacity\['star'\]=0.0 must lie in \(0, 1\]"):
        SceneConfig(opacity={"star": 0.0})
    with pytest.raises(ValueError, match="opacity: unknown category 'unicorn'"):
        SceneConfig(opacity={"unicorn": 0.5})


def test_config_validation_and_files(tmp_path):
    with pytest.raises(ValueError, match="partner of both"):
        SceneConfig(cooccurrence={"moon": {"star": 0.9}, "heart": {"star": 0.5}})
    with pytest.raises(ValueError, match="both a trigger and a partner"):
        SceneConfig(cooccurrence={"moon": {"star": 0.9}, "star": {"heart": 0.5}})
    with pytest.raises(ValueError, match="unknown category 'unicorn'"):
        SceneConfig(category_weights={"unicorn": 2.0})
    with pytest.raises(ValueError, match="not a probability"):
        SceneConfig(cooccurrence={"moon": {"star": 1.5}})
    good = tmp_path / "bias.yaml"
    good.write_text("image_size: 96\ncooccurrence:\n  arrow: {cross: 0.7}\n")
    config = SceneConfig.from_file(good)
    assert config.image_size == 96 and config.cooccurrence == {"arrow": {"cross": 0.7}}
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_sise: 96\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*image_sise"):
        SceneConfig.from_file(bad)


def test_chair_vocabulary_file(tmp_path):
    paths = generate_scenes(tmp_path, 8, seed=0, render=False)
    vocabulary = json.loads(paths["chair_vocab"].read_text())
    assert vocabulary["categories"] == list(CATEGORIES)
    assert vocabulary["inverse_synonym_dict"]["crescent"] == "moon"
    assert vocabulary["double_word_dict"]["lightning bolt"] == "lightning bolt"
    assert vocabulary["inverse_synonym_dict"]["lightning bolt"] == "bolt"


def test_command_line(tmp_path, capsys):
    import argparse

    from data.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    (tmp_path / "bias.json").write_text(json.dumps({"cooccurrence": {"arrow": {"cross": 1.0}}}))
    args = parser.parse_args(["data", "scenes", "--out", str(tmp_path / "out"), "--images", "10", "--seed", "1",
                              "--size", "48", "--config", str(tmp_path / "bias.json")])
    assert args.func(args) == 0
    assert Image.open(tmp_path / "out" / "images" / "train" / "000000000001.png").size == (48, 48)
    saved = json.loads((tmp_path / "out" / "scene_config.json").read_text())
    assert saved["image_size"] == 48 and saved["cooccurrence"] == {"arrow": {"cross": 1.0}}
    args = parser.parse_args(["data", "pope", "--instances", str(tmp_path / "out" / "instances_train.json"),
                              "--out", str(tmp_path / "pope"), "--images", "0"])
    assert args.func(args) == 0
    assert len(read_pope_file(tmp_path / "pope" / "pope_adversarial.json")) % 6 == 0
    assert "images/s" in capsys.readouterr().out


def test_scenes_folder_finds_every_file_in_either_image_format(tmp_path):
    """`ScenesFolder` is the one owner of the layout: the paths `generate_scenes` reports are the folder's, and an
    image is found under the format the folder was generated with (a JPEG folder too)."""
    from PIL import Image

    from data.scene_folder import ScenesFolder
    from data.scenes import SceneConfig, generate_scenes

    for image_format in ("png", "jpg"):
        root = tmp_path / image_format
        paths = generate_scenes(root, 20, seed=0, config=SceneConfig(image_format=image_format))
        folder = ScenesFolder(root)
        assert folder.image_format == image_format and folder.is_generated()
        for split in paths["instances"]:
            assert (paths["instances"][split], paths["captions"][split], paths["conversations"][split]) == (
                folder.instances(split), folder.captions(split), folder.conversations(split))
            assert paths["pope"][split] == {strategy: folder.pope(split, strategy) for strategy in paths["pope"][split]}
            first = json.loads(folder.instances(split).read_text())["images"][0]
            with Image.open(folder.image(split, first["id"])) as image:
                assert image.format == {"png": "PNG", "jpg": "JPEG"}[image_format]
                assert folder.image(split, first["id"]).name == first["file_name"]
    missing = ScenesFolder(tmp_path / "none")
    assert not missing.is_generated()
    with pytest.raises(FileNotFoundError, match="vlm data scenes --out"):
        missing.scene_config()

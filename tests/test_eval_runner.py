"""The resumable evaluation runner: a killed or crashed run resumes to the same answers and metrics as an
uninterrupted one, settings are never mixed, failed inputs are retried; end to end on synthetic scenes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from data.images import load_image
from data.scenes import SceneConfig, generate_scenes
from eval.chair import evaluate_chair
from eval.inference import load_model
from eval.pope import evaluate_pope
from eval.report import write_report
from eval.runner import SettingsMismatchError
from eval.sources import scenes_chair, scenes_pope
from eval.tasks import run_chair, run_pope
from eval.vqa import vqa_accuracy
from vlm.cli import main
from vlm.testing import tiny_vlm

REPO = Path(__file__).resolve().parents[1]
GENERATION = {"max_new_tokens": 4, "do_sample": False}
# untrained tiny models write control characters, which the example plots cannot draw
pytestmark = pytest.mark.filterwarnings("ignore:Glyph .* missing from font")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny model and a small scenes folder (test split only, two POPE questions per image)."""
    root = tmp_path_factory.mktemp("eval")
    model, processor = tiny_vlm(seed=11)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    config = SceneConfig(image_size=32, splits={"test": 1.0}, pope_per_image=1, captions_per_image=2)
    generate_scenes(root / "scenes", num_images=6, seed=3, config=config)
    return root


@pytest.fixture(scope="module")
def loaded(setup):
    return load_model(setup / "model", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def pope_random(setup):
    splits, image_root = scenes_pope(setup / "scenes", "test")
    return splits["random"], image_root


def generate_one(model, processor, image, prompt, max_new_tokens):
    inputs = processor(images=[image], text=[f"<image>\n{prompt}"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0]


def read_answers(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def public(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("answers_file", "errors")}


@pytest.fixture(scope="module")
def uninterrupted(setup, loaded, pope_random, tmp_path_factory):
    """POPE metrics and answers of one uninterrupted batched run."""
    questions, image_root = pope_random
    path = tmp_path_factory.mktemp("full") / "answers.jsonl"
    metrics = run_pope(*loaded, questions, image_root, path, batch_size=4, generation_kwargs=GENERATION)
    return metrics, read_answers(path)


class CountingGenerate:
    """Wraps `model.generate`: counts calls, optionally raises on call number `fail_at`."""

    def __init__(self, model, fail_at=None):
        self.model, self.original, self.fail_at, self.calls = model, model.generate, fail_at, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return self.original(**kwargs)


@pytest.fixture
def counting(loaded, monkeypatch):
    def install(fail_at=None):
        counter = CountingGenerate(loaded[0], fail_at)
        monkeypatch.setattr(loaded[0], "generate", counter)
        return counter
    return install


def test_pope_equals_sequential_reference(loaded, pope_random, uninterrupted):
    model, processor = loaded
    questions, image_root = pope_random
    metrics, records = uninterrupted
    reference = {q["question_id"]: generate_one(model, processor, load_image(image_root / q["image"]), q["text"], 4)
                 for q in questions}
    assert {r["question_id"]: r["answer"] for r in records} == reference
    assert len(set(reference.values())) > 1  # answers differ, so a question/answer mix-up would show
    assert public(metrics) == {**evaluate_pope(questions, reference), "n_errors": 0}
    assert [r["label"] for r in records] == [q["label"] for q in questions]


def test_resume_after_sigkill(setup, loaded, pope_random, uninterrupted, tmp_path, counting):
    questions, image_root = pope_random
    answers = tmp_path / "answers.jsonl"
    script = tmp_path / "slow_run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import torch
        torch.set_num_threads(1)
        from eval.inference import load_model
        from eval.sources import scenes_pope
        from eval.tasks import run_pope
        model, processor = load_model({str(setup / "model")!r}, device="cpu", dtype="float32")
        original = model.generate
        def slow_generate(**kwargs):
            time.sleep(0.5)
            return original(**kwargs)
        model.generate = slow_generate
        splits, image_root = scenes_pope({str(setup / "scenes")!r}, "test")
        run_pope(model, processor, splits["random"], image_root, {str(answers)!r}, batch_size=2,
                 generation_kwargs={GENERATION!r})
    """))
    process = subprocess.Popen([sys.executable, str(script)], cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        if answers.is_file() and answers.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished (or failed) before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = answers.read_text().count("\n")
    assert 2 <= done < len(questions)

    counter = counting()
    metrics = run_pope(*loaded, questions, image_root, answers, batch_size=2, generation_kwargs=GENERATION)
    records = read_answers(answers)
    assert sorted(r["question_id"] for r in records) == sorted(q["question_id"] for q in questions)
    assert counter.calls == -(-(len(questions) - done) // 2)  # only what was missing is generated
    assert public(metrics) == public(uninterrupted[0])
    assert {r["question_id"]: r["answer"] for r in records} == {r["question_id"]: r["answer"] for r in uninterrupted[1]}


def test_crash_after_two_batches_and_truncated_line_then_resume(loaded, pope_random, uninterrupted, tmp_path,
                                                                counting):
    questions, image_root = pope_random
    answers = tmp_path / "answers.jsonl"
    counting(fail_at=3)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_pope(*loaded, questions, image_root, answers, batch_size=2, generation_kwargs=GENERATION)
    assert len(read_answers(answers)) == 4
    with open(answers, "a") as handle:  # a line cut short by a kill during the write
        handle.write('{"question_id": %d, "ans' % questions[4]["question_id"])
    counter = counting()
    metrics = run_pope(*loaded, questions, image_root, answers, batch_size=2, generation_kwargs=GENERATION)
    assert counter.calls == -(-(len(questions) - 4) // 2)
    assert [r["question_id"] for r in read_answers(answers)] == [q["question_id"] for q in questions]
    assert public(metrics) == public(uninterrupted[0])


def test_other_settings_are_refused_unless_overwrite(loaded, pope_random, tmp_path):
    questions, image_root = pope_random
    answers = tmp_path / "answers.jsonl"
    run_pope(*loaded, questions[:2], image_root, answers, generation_kwargs=GENERATION)
    with pytest.raises(SettingsMismatchError, match="max_new_tokens.*overwrite"):
        run_pope(*loaded, questions[:2], image_root, answers, generation_kwargs={**GENERATION, "max_new_tokens": 3})
    with pytest.raises(SettingsMismatchError, match="prompt"):
        run_pope(*loaded, questions[:2], image_root, answers, generation_kwargs=GENERATION, prompt_suffix=" Yes/no?")
    metrics = run_pope(*loaded, questions[:2], image_root, answers,
                       generation_kwargs={**GENERATION, "max_new_tokens": 3}, overwrite=True)
    assert metrics["n"] == 2 and len(read_answers(answers)) == 2
    assert json.loads((tmp_path / "answers.jsonl.settings.json").read_text())["generation"]["max_new_tokens"] == 3


def test_unreadable_image_is_reported_then_retried(setup, loaded, pope_random, uninterrupted, tmp_path, counting):
    questions, image_root = pope_random
    broken_root = tmp_path / "images"
    broken_root.mkdir()
    for path in image_root.iterdir():
        (broken_root / path.name).write_bytes(path.read_bytes())
    victim = questions[0]["image"]
    (broken_root / victim).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    answers = tmp_path / "answers.jsonl"
    metrics = run_pope(*loaded, questions, broken_root, answers, batch_size=4, generation_kwargs=GENERATION)
    affected = [q["question_id"] for q in questions if q["image"] == victim]
    assert metrics["n_errors"] == len(affected) and metrics["n"] == len(questions) - len(affected)
    assert victim in metrics["errors"][0]["error"]

    (broken_root / victim).write_bytes((image_root / victim).read_bytes())
    counter = counting()
    metrics = run_pope(*loaded, questions, broken_root, answers, batch_size=4, generation_kwargs=GENERATION)
    assert counter.calls == 1 and metrics["n_errors"] == 0
    assert sorted(r["question_id"] for r in read_answers(answers)) == sorted(q["question_id"] for q in questions)
    assert public(metrics) == public(uninterrupted[0])


def test_chair_equals_sequential_reference_and_report(setup, loaded, tmp_path):
    model, processor = loaded
    images, ground_truth, vocabulary = scenes_chair(setup / "scenes", "test")
    prompt = "Describe the image."
    generation = {"max_new_tokens": 8, "do_sample": False}
    metrics = run_chair(model, processor, images, ground_truth, vocabulary, tmp_path / "chair_8tok.answers.jsonl",
                        prompt=prompt, batch_size=4, generation_kwargs=generation)
    captions = [{"image_id": image_id, "caption": generate_one(model, processor, load_image(path), prompt, 8)}
                for image_id, path in images]
    assert public(metrics) == {**evaluate_chair(captions, ground_truth, vocabulary, max_new_tokens=8), "n_errors": 0}

    summary = write_report(tmp_path, "chair", metrics, "tiny", generation, dict(images), name="chair_8tok")
    assert summary["headline"]["chair_s"] == metrics["chair_s"] and summary["n_errors"] == 0
    assert json.loads((tmp_path / "chair_8tok_summary.json").read_text())["headline"] == summary["headline"]
    for name in ("chair_vs_length.png", "chair_8tok_examples.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_pope_vqa_and_refused_settings(setup, tmp_path, capsys):
    base = ["eval", "pope", "--model", str(setup / "model"), "--scenes", str(setup / "scenes"), "--out", str(tmp_path),
            "--limit", "3", "--max-new-tokens", "3", "--no-progress"]
    assert main(base) == 0
    summary = json.loads((tmp_path / "pope_summary.json").read_text())
    assert set(summary["headline"]) == {"random", "popular", "adversarial", "average"}
    for split in ("random", "popular", "adversarial"):
        assert len(read_answers(tmp_path / f"pope_{split}.answers.jsonl")) == 3
    assert (tmp_path / "pope_metrics.png").is_file() and (tmp_path / "pope_yes_ratio.png").is_file()
    capsys.readouterr()
    assert main(base[:-2] + ["4", "--no-progress"]) == 2
    assert "refusing to mix" in capsys.readouterr().err

    assert main(["eval", "vqa", "--model", str(setup / "model"), "--scenes", str(setup / "scenes"), "--out",
                 str(tmp_path), "--limit", "4", "--max-new-tokens", "3", "--no-progress"]) == 0
    records = read_answers(tmp_path / "vqa.answers.jsonl")
    from eval.sources import scenes_vqa

    references = {q["question_id"]: q["answers"] for q in scenes_vqa(setup / "scenes", "test")}
    expected = vqa_accuracy([r["answer"] for r in records], [references[r["question_id"]] for r in records])
    assert json.loads((tmp_path / "vqa_summary.json").read_text())["headline"] == \
        {"accuracy": expected["accuracy"], "n": 4}


def test_captions_results_file_and_metric_inputs(setup, loaded, tmp_path, monkeypatch):
    """The COCO metrics (Java, slow) are tested in their own module; here: what the runner hands them."""
    import eval.caption_metrics
    from eval.sources import scenes_captions
    from eval.tasks import run_captions

    seen = {}

    def spy(references, candidates, spice=None):
        seen.update(references=references, candidates=candidates)
        return {"metrics": {"CIDEr": 0.5}, "per_image": {}, "n_images": len(candidates), "notes": []}

    monkeypatch.setattr(eval.caption_metrics, "evaluate_captions", spy)
    images, references = scenes_captions(setup / "scenes", "test")
    result = run_captions(*loaded, images, references, tmp_path / "captions.answers.jsonl",
                          tmp_path / "results.json", generation_kwargs={"max_new_tokens": 5}, batch_size=4)
    results = json.loads((tmp_path / "results.json").read_text())
    answered = read_answers(tmp_path / "captions.answers.jsonl")
    assert results == [{"image_id": r["image_id"], "caption": r["answer"]} for r in answered]
    assert [r["image_id"] for r in results] == [image_id for image_id, _ in images]
    assert seen["candidates"] == {r["image_id"]: r["caption"] for r in results}
    assert seen["references"] == references and all(len(refs) == 2 for refs in references.values())
    assert result["metrics"] == {"CIDEr": 0.5} and result["n_errors"] == 0


def test_eval_cli_chair_on_coco_images(setup, shared_data, tmp_path, capsys):
    """The COCO path: a fixed image-id list, val2014 file names, the shipped ground truth and synonyms."""
    from eval.chair import ChairVocabulary

    ids = [60623, 354533, 579664]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    out = tmp_path / "out"
    code = main(["eval", "chair", "--model", str(setup / "model"), "--out", str(out), "--image-ids",
                 str(tmp_path / "ids.json"), "--image-root", str(shared_data / "coco_mini"), "--ground-truth",
                 str(shared_data / "chair" / "coco2014_chair_gt_objects.json.gz"), "--synonyms",
                 str(shared_data / "chair" / "chair_synonyms.json"), "--max-new-tokens", "6", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    records = read_answers(out / "chair_6tok.answers.jsonl")
    assert [r["image_id"] for r in records] == ids
    assert records[0]["file"].endswith("COCO_val2014_000000060623.jpg")
    ground_truth = {"60623": {"bowl", "dining table", "person", "spoon", "wine glass"},  # from the shipped file
                    "354533": {"motorcycle", "person", "sheep"}, "579664": {"banana", "bowl"}}
    expected = evaluate_chair([{"image_id": r["image_id"], "caption": r["answer"]} for r in records], ground_truth,
                              ChairVocabulary.load(shared_data / "chair" / "chair_synonyms.json"), max_new_tokens=6)
    summary = json.loads((out / "chair_6tok_summary.json").read_text())
    assert summary["headline"] == {key: expected[key] for key in summary["headline"]}
    assert summary["generation"] == {"max_new_tokens": 6, "num_beams": 1, "do_sample": False}


def test_many_missing_images_print_no_metric(setup, tmp_path, capsys, caplog):
    """POPE on a folder that lacks most of the images: the missing count is said before answering, and with
    more failures than --max-error-rate no metric is printed (it would describe the few answered questions)."""
    import shutil

    scenes = tmp_path / "scenes"
    shutil.copytree(setup / "scenes", scenes)
    images = sorted((scenes / "images" / "test").iterdir())
    for image in images[1:]:
        image.unlink()
    base = ["eval", "pope", "--model", str(setup / "model"), "--scenes", str(scenes), "--max-new-tokens", "2",
            "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "strict")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no headline
    assert "inputs failed" in captured.err and "more than --max-error-rate 1.0%" in captured.err
    assert "image file not found" in captured.err
    assert "images to answer are missing" in caplog.text
    assert main([*base, "--out", str(tmp_path / "lenient"), "--max-error-rate", "1"]) == 1  # failures still count
    captured = capsys.readouterr()
    headline = json.loads(captured.out)
    assert headline["random"]["n"] >= 1 and "inputs failed" in captured.err


def test_new_weights_in_the_same_folder_are_not_resumed_from(setup, tmp_path, capsys):
    import shutil

    from vlm.testing import tiny_vlm

    folder = tmp_path / "model"
    shutil.copytree(setup / "model", folder)
    base = ["eval", "pope", "--model", str(folder), "--scenes", str(setup / "scenes"), "--out", str(tmp_path / "out"),
            "--limit", "2", "--max-new-tokens", "2", "--no-progress"]
    assert main(base) == 0
    assert main(base) == 0  # the same weights resume (nothing left to answer)
    retrained, _ = tiny_vlm(seed=12)  # a newer checkpoint written over the folder's weights
    retrained.save_pretrained(folder)
    capsys.readouterr()
    assert main(base) == 2
    error = capsys.readouterr().err
    assert "refusing to mix" in error and "weights" in error
    assert main([*base, "--overwrite"]) == 0


def test_the_models_prompt_conventions_are_the_evaluation_default(setup, tmp_path):
    """A model trained on questions without a suffix says so in its processor; `vlm eval vqa` then asks them that
    way unless --prompt-suffix says otherwise."""
    import shutil

    from vlm import VLMProcessor

    folder = tmp_path / "model"
    shutil.copytree(setup / "model", folder)
    processor = VLMProcessor.from_pretrained(folder)
    processor.prompts = {"vqa_suffix": " One word:"}
    processor.save_pretrained(folder)
    assert VLMProcessor.from_pretrained(folder).prompts == {"vqa_suffix": " One word:"}
    base = ["eval", "vqa", "--model", str(folder), "--scenes", str(setup / "scenes"), "--limit", "2",
            "--max-new-tokens", "2", "--no-progress"]

    def asked(out):
        settings = json.loads((out / "vqa.answers.jsonl.settings.json").read_text())
        return settings["prompt"]

    assert main([*base, "--out", str(tmp_path / "saved")]) == 0
    assert asked(tmp_path / "saved").endswith("{question} One word:")
    assert main([*base, "--out", str(tmp_path / "given"), "--prompt-suffix", " Answer:"]) == 0
    assert asked(tmp_path / "given").endswith("{question} Answer:")

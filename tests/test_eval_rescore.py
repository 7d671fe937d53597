"""Outputs of other codebases scored without a model: `vlm eval pope --answers`, `vlm eval chair --captions`."""

import json

import pytest

from data.pope import read_pope_file
from eval.chair import ChairVocabulary, evaluate_chair, load_captions, load_chair_ground_truth
from eval.pope import CONVENTIONS, evaluate_pope
from vlm.cli import main

SPLITS = ("random", "popular", "adversarial")


def llava_answers(questions, path, every: int = 1):
    """Answers as LLaVA's model_vqa_loader writes them (`text`), a different style per question, every
    `every`-th question left out."""
    styles = ["Yes, there is.", "No", "yes", "There is no such object.", "no, I don't see one"]
    with open(path, "w") as handle:
        for index, question in enumerate(questions):
            if index % every == every - 1 and every > 1:
                continue
            handle.write(json.dumps({"question_id": question["question_id"], "prompt": question["text"],
                                     "text": styles[index % len(styles)], "model_id": "llava-v1.5-7b"}) + "\n")
    return path


def test_pope_answers_of_another_codebase_under_every_convention(shared_data, tmp_path, capsys):
    files = [shared_data / "pope" / f"coco_pope_{split}.json" for split in SPLITS]
    questions = {split: read_pope_file(path)[:200] for split, path in zip(SPLITS, files)}
    answers = [llava_answers(questions[split], tmp_path / f"{split}.jsonl") for split in SPLITS]
    code = main(["eval", "pope", "--pope-files", *map(str, files), "--answers", *map(str, answers),
                 "--out", str(tmp_path / "out"), "--limit", "200"])
    headline = json.loads(capsys.readouterr().out)
    assert code == 0
    for split, path in zip(SPLITS, answers):
        texts = {json.loads(line)["question_id"]: json.loads(line)["text"] for line in path.read_text().splitlines()}
        expected = evaluate_pope(questions[split], texts, "official")
        assert headline[split]["accuracy"] == round(expected["accuracy"], 4) and headline[split]["n"] == 200
        for convention in CONVENTIONS:
            assert headline["accuracy_by_convention"][convention][split] == \
                round(evaluate_pope(questions[split], texts, convention)["accuracy"], 4)
    # the conventions disagree on these answers ("There is no such object." is no plain yes/no)
    assert len({row["random"] for row in headline["accuracy_by_convention"].values()}) > 1


def test_missing_answers_count_as_failures(shared_data, tmp_path, capsys):
    files = [shared_data / "pope" / f"coco_pope_{split}.json" for split in SPLITS]
    answers = [llava_answers(read_pope_file(path)[:100], tmp_path / f"{split}.jsonl", every=4)
               for split, path in zip(SPLITS, files)]
    code = main(["eval", "pope", "--pope-files", *map(str, files), "--answers", *map(str, answers),
                 "--out", str(tmp_path / "out"), "--limit", "100"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == "" and "75 of 300 inputs failed" in captured.err
    assert main(["eval", "pope", "--pope-files", *map(str, files), "--answers", str(answers[0]),
                 "--out", str(tmp_path / "out")]) == 2
    assert "one answers file per split" in capsys.readouterr().err


def test_chair_captions_of_another_codebase(shared_data, tmp_path, capsys):
    chair = shared_data / "chair"
    captions = chair / "opera_llava15" / "greedy.jsonl"
    code = main(["eval", "chair", "--captions", str(captions), "--ground-truth",
                 str(chair / "coco2014_chair_gt_objects.json.gz"), "--synonyms", str(chair / "chair_synonyms.json"),
                 "--out", str(tmp_path)])
    headline = json.loads(capsys.readouterr().out)
    assert code == 0
    expected = evaluate_chair(load_captions(captions), load_chair_ground_truth(chair / "coco2014_chair_gt_objects.json.gz"),
                              ChairVocabulary.load(chair / "chair_synonyms.json"))
    assert headline["n_captions"] == 500
    assert headline["chair_s"] == pytest.approx(expected["chair_s"]) and headline["chair_i"] == pytest.approx(
        expected["chair_i"])


def test_model_and_outputs_exclude_each_other(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"question_id": 1, "text": "yes"}\n')
    assert main(["eval", "pope", "--model", str(tmp_path), "--answers", str(tmp_path / "a.jsonl"),
                 "--out", str(tmp_path)]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["eval", "pope", "--out", str(tmp_path)]) == 2
    assert "needs --model (or --answers FILE" in capsys.readouterr().err
    question = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}
    (tmp_path / "coco_pope_random.json").write_text(json.dumps(question) + "\n")
    (tmp_path / "b.jsonl").write_text('{"question_id": 1}\n')
    assert main(["eval", "pope", "--pope-files", str(tmp_path / "coco_pope_random.json"), "--answers",
                 str(tmp_path / "b.jsonl"), "--out", str(tmp_path)]) == 2
    assert "b.jsonl: record 1 needs 'question_id' and an answer text" in capsys.readouterr().err


def pope_answers(questions, path, right_every: int):
    """Plain yes/no answers: the label for every `right_every`-th question, always "yes" otherwise."""
    with open(path, "w") as handle:
        for index, question in enumerate(questions):
            text = question["label"] if index % right_every == 0 else "yes"
            handle.write(json.dumps({"question_id": question["question_id"], "text": text}) + "\n")
    return path


def test_pope_change_from_a_baseline_run_with_paired_intervals(shared_data, tmp_path, capsys):
    """Always "yes" (the baseline) against answers right on every third question too: accuracy rises by the share
    of "no" questions among those, outside noise; the baseline against itself changes nothing, within noise."""
    files = [shared_data / "pope" / f"coco_pope_{split}.json" for split in SPLITS]
    questions = {split: read_pope_file(path)[:200] for split, path in zip(SPLITS, files)}
    plain = [pope_answers(questions[split], tmp_path / f"plain_{split}.jsonl", 10 ** 9) for split in SPLITS]
    better = [pope_answers(questions[split], tmp_path / f"better_{split}.jsonl", 3) for split in SPLITS]
    common = ["eval", "pope", "--pope-files", *map(str, files), "--limit", "200"]
    assert main([*common, "--answers", *map(str, plain), "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*common, "--answers", *map(str, better), "--out", str(tmp_path / "better"),
                 "--baseline", str(tmp_path / "plain")]) == 0
    changes = json.loads(capsys.readouterr().out)["versus_baseline"]
    for split in SPLITS:
        labels = [q["label"] for q in questions[split]]
        gained = sum(1 for index, label in enumerate(labels) if index % 3 == 0 and label == "no")  # by hand
        accuracy = changes[split]["accuracy"]
        assert accuracy["change"] == round(gained / 200, 4) and changes[split]["n"] == 200
        assert accuracy["ci95"][0] > 0 and not accuracy["within_noise"]
        assert changes[split]["yes_ratio"]["change"] == round(-gained / 200, 4)
    assert main([*common, "--answers", *map(str, plain), "--out", str(tmp_path / "again"),
                 "--baseline", str(tmp_path / "plain" / "pope_details.json")]) == 0
    same = json.loads(capsys.readouterr().out)["versus_baseline"]["random"]["accuracy"]
    assert same == {"change": 0.0, "ci95": [0.0, 0.0], "within_noise": True}
    report = (tmp_path / "again" / "pope_report.md").read_text()  # the markdown report shows the same change
    assert "| random | +0.0000 [+0.0000, +0.0000] (noise) |" in report
    better_report = (tmp_path / "better" / "pope_report.md").read_text()
    random_accuracy = changes["random"]["accuracy"]
    assert f"| random | {random_accuracy['change']:+.4f} [{random_accuracy['ci95'][0]:+.4f}, " in better_report
    summary = json.loads((tmp_path / "again" / "pope_summary.json").read_text())
    assert summary["result"]["versus_baseline"]["baseline"].endswith("pope_details.json")
    assert main([*common, "--answers", *map(str, plain), "--out", str(tmp_path / "x"),
                 "--baseline", str(tmp_path)]) == 2
    assert "--baseline:" in capsys.readouterr().err


def test_chair_change_from_a_baseline_run(shared_data, tmp_path, capsys):
    """OPERA's LLaVA-1.5 captions against its greedy ones (the published logs): the change in CHAIR is the
    difference of the two runs' values, and its paired interval holds it."""
    chair = shared_data / "chair"
    common = ["eval", "chair", "--ground-truth", str(chair / "coco2014_chair_gt_objects.json.gz"),
              "--synonyms", str(chair / "chair_synonyms.json")]
    assert main([*common, "--captions", str(chair / "opera_llava15" / "greedy.jsonl"), "--out",
                 str(tmp_path / "greedy")]) == 0
    greedy = json.loads(capsys.readouterr().out)
    assert main([*common, "--captions", str(chair / "opera_llava15" / "ours.jsonl"), "--out", str(tmp_path / "opera"),
                 "--baseline", str(tmp_path / "greedy")]) == 0
    opera = json.loads(capsys.readouterr().out)
    change = opera["versus_baseline"]["chair_s"]
    assert change["change"] == pytest.approx(opera["chair_s"] - greedy["chair_s"], abs=1e-4)
    assert change["ci95"][0] <= change["change"] <= change["ci95"][1]
    assert change["within_noise"] == (change["ci95"][0] <= 0 <= change["ci95"][1])
    assert opera["versus_baseline"]["n"] == 500

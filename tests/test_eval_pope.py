"""POPE answer parsing and metrics against hand-worked numbers, for every supported convention."""

import json
import math
from pathlib import Path

import pytest

from data.jsonl import DataFormatError
from data.pope import read_pope_file
from eval.pope import (
    evaluate_pope,
    evaluate_pope_splits,
    load_pope_answers,
    parse_pope_answer,
    pope_file_version,
    pope_metrics,
)

# (label, answer, expected parse under official / opera / vcd / lmms_eval); None = unparsed.
TRICKY = [
    ("yes", "Yes, there is a dog in the image.", "yes", "yes", "yes", None),
    ("no", "No, there is no cat.", "no", "no", "no", None),
    # official/opera read "not" (official: in the first sentence); vcd finds "yes" anywhere
    ("yes", "There is not a single doubt. Yes.", "no", "no", "yes", None),
    # official only knows "No"/"no"/"not": upper-case "NO" counts as yes
    ("no", "NO", "yes", "no", "no", "no"),
    ("yes", "yes", "yes", "yes", "yes", "yes"),
    # official keeps the first sentence only, and "don't" is not a negation word for it; opera catches "n't"
    ("no", "I don't see one. There is no bus.", "yes", "no", "no", None),
    # empty answers are yes for official/opera; vcd needs "yes" in the text of a yes-question
    ("yes", "", "yes", "yes", "no", None),
    # a newline is not a word separator for official/opera ("Yes\nno" is one word)
    ("no", "Yes\nno", "yes", "yes", "no", None),
    # vcd's substring test: "know" contains "no"
    ("no", "I know it is there", "yes", "yes", "no", None),
    ("yes", " Yes ", "yes", "yes", "yes", "yes"),
    ("no", "No.", "no", "no", "no", None),
    ("yes", "not sure, but yes", "no", "no", "yes", None),
]
CONVENTIONS = ("official", "opera", "vcd", "lmms_eval")


@pytest.mark.parametrize("column, convention", list(enumerate(CONVENTIONS)))
def test_parse_tricky_answers(column, convention):
    for label, answer, *expected in TRICKY:
        assert parse_pope_answer(answer, convention, label=label) == expected[column], (convention, answer)


def test_aliases_match_their_codebase():
    for label, answer, *_ in TRICKY:
        assert parse_pope_answer(answer, "llava") == parse_pope_answer(answer, "official")
        assert parse_pope_answer(answer, "pai") == parse_pope_answer(answer, "opera")
    assert parse_pope_answer("Yes") == "yes"  # official is the default


def test_bad_convention_and_missing_label():
    with pytest.raises(ValueError, match="unknown POPE convention"):
        parse_pope_answer("yes", "strict")
    with pytest.raises(ValueError, match="label"):
        parse_pope_answer("yes", "vcd")


@pytest.fixture
def tricky_split():
    questions = [{"question_id": i + 1, "label": label} for i, (label, *_) in enumerate(TRICKY)]
    answers = {i + 1: answer for i, (_, answer, *_) in enumerate(TRICKY)}
    return questions, answers


# Worked out from the table above (questions 1..12, labels y n y n y n y n n y n y).
EXPECTED = {
    # TP = q1,5,7,10 = 4; FN = q3,12 = 2; FP = q4,6,8,9 = 4; TN = q2,11 = 2
    "official": dict(tp=4, fp=4, tn=2, fn=2, unparsed=0, accuracy=6 / 12, precision=4 / 8, recall=4 / 6,
                     f1=2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3), yes_ratio=8 / 12),  # f1 = 4/7
    # TP = q1,5,7,10 = 4; FN = q3,12 = 2; FP = q8,9 = 2; TN = q2,4,6,11 = 4
    "opera": dict(tp=4, fp=2, tn=4, fn=2, unparsed=0, accuracy=8 / 12, precision=4 / 6, recall=4 / 6,
                  f1=2 / 3, yes_ratio=6 / 12),
    # TP = q1,3,5,10,12 = 5; FN = q7 = 1; FP = 0; TN = q2,4,6,8,9,11 = 6
    "vcd": dict(tp=5, fp=0, tn=6, fn=1, unparsed=0, accuracy=11 / 12, precision=5 / 5, recall=5 / 6,
                f1=2 * 1 * (5 / 6) / (1 + 5 / 6), yes_ratio=5 / 12),  # f1 = 10/11
    # only q4 ("NO" -> no), q5 ("yes"), q10 (" Yes ") parse: TN = 1, TP = 2, 9 unparsed (wrong for accuracy)
    "lmms_eval": dict(tp=2, fp=0, tn=1, fn=0, unparsed=9, accuracy=3 / 12, precision=2 / 2, recall=2 / 2,
                      f1=1.0, yes_ratio=2 / 12),
}


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_evaluate_pope_hand_worked(tricky_split, convention):
    questions, answers = tricky_split
    result = evaluate_pope(questions, answers, convention)
    assert result["n"] == 12 and result["convention"] == convention
    for key, value in EXPECTED[convention].items():
        assert result[key] == pytest.approx(value), key


def test_metrics_edge_cases():
    # no "yes" prediction: precision undefined -> 0.0 (official would divide by zero), F1 too
    result = pope_metrics(["yes", "no"], ["no", "no"])
    assert (result["precision"], result["recall"], result["f1"], result["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="label #1"):
        pope_metrics(["yes", "maybe"], ["yes", "no"])
    with pytest.raises(ValueError, match="2 labels but 1"):
        pope_metrics(["yes", "no"], ["yes"])


def test_missing_answer_is_an_error(tricky_split):
    questions, answers = tricky_split
    del answers[3]
    with pytest.raises(KeyError, match=r"question_id \[3\]"):
        evaluate_pope(questions, answers)


def test_answer_file_and_split_average(tmp_path, tricky_split):
    questions, answers = tricky_split
    # answers in POPE's "answer" field, CRLF line endings
    answer_file = tmp_path / "a.jsonl"
    answer_file.write_bytes(b"".join(json.dumps({"question_id": k, "answer": v}).encode() + b"\r\n"
                                     for k, v in answers.items()))
    assert load_pope_answers(answer_file) == answers
    # second split: every answer "yes" -> TP 6, FP 6: accuracy 1/2, precision 1/2, recall 1, F1 2/3, yes 1
    all_yes = {q["question_id"]: "Yes." for q in questions}
    report = evaluate_pope_splits({"a": (questions, load_pope_answers(answer_file)), "b": (questions, all_yes)})
    assert report["splits"]["b"]["f1"] == pytest.approx(2 / 3)
    average = report["average"]
    assert average["accuracy"] == pytest.approx((6 / 12 + 1 / 2) / 2)
    assert average["recall"] == pytest.approx((4 / 6 + 1) / 2)
    assert average["f1"] == pytest.approx((4 / 7 + 2 / 3) / 2)
    assert average["yes_ratio"] == pytest.approx((8 / 12 + 1) / 2)


def test_bad_answer_file_names_the_record(tmp_path):
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 2}\n')  # LLaVA's "text" key is accepted
    with pytest.raises(DataFormatError, match="answer 2"):
        load_pope_answers(bad)


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_official_files(shared_data: Path, split):
    path = shared_data / "pope" / f"coco_pope_{split}.json"
    questions = read_pope_file(path)
    assert len(questions) == 3000
    assert sum(q["label"] == "yes" for q in questions) == 1500
    assert pope_file_version(path)["version"] == f"AoiDragon/POPE@109985c coco {split}"
    # an oracle scores 1.0 with yes-ratio 0.5; "always yes" gives P 0.5, R 1, F1 2/3
    oracle = evaluate_pope(questions, {q["question_id"]: q["label"].capitalize() + "." for q in questions})
    assert (oracle["accuracy"], oracle["f1"], oracle["yes_ratio"]) == (1.0, 1.0, 0.5)
    always_yes = evaluate_pope(questions, {q["question_id"]: "Yes, there is." for q in questions})
    assert math.isclose(always_yes["f1"], 2 / 3) and always_yes["precision"] == 0.5 and always_yes["recall"] == 1.0


def test_plots_show_the_metrics(tmp_path, tricky_split):
    from eval.plots import plot_pope_metrics, plot_pope_yes_ratio

    questions, answers = tricky_split
    all_yes = {q["question_id"]: "Yes" for q in questions}
    report = evaluate_pope_splits({"random": (questions, answers), "popular": (questions, all_yes)})
    drawn = plot_pope_metrics(report, tmp_path / "pope.png")
    assert drawn["random"]["f1"] == pytest.approx(100 * 4 / 7)
    assert drawn["popular"]["precision"] == pytest.approx(50.0) and drawn["popular"]["recall"] == pytest.approx(100)
    assert drawn["average"]["accuracy"] == pytest.approx(100 * (6 / 12 + 1 / 2) / 2)
    yes = plot_pope_yes_ratio(report, tmp_path / "sub" / "yes.pdf")
    assert yes == pytest.approx({"random": 100 * 8 / 12, "popular": 100.0, "average": 100 * (8 / 12 + 1) / 2})
    assert (tmp_path / "pope.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sub" / "yes.pdf").read_bytes()[:5] == b"%PDF-"


def test_bootstrap_intervals_match_the_normal_approximation():
    """Accuracy of 400 answers, 300 right: the 95% interval is close to p +- 1.96 sqrt(p (1 - p) / n), contains
    the estimate, is the same on every call (seeded), and a paired interval of a run against itself is [0, 0]."""
    import numpy as np

    from eval.pope import item_counts, metrics_from_counts, pope_metrics
    from eval.stats import paired_intervals

    labels = ["yes", "no"] * 200
    predictions = [label if index % 4 else ("no" if label == "yes" else "yes") for index, label in enumerate(labels)]
    metrics = pope_metrics(labels, predictions)
    assert metrics["accuracy"] == 0.75
    low, high = metrics["ci95"]["accuracy"]
    half = 1.96 * np.sqrt(0.75 * 0.25 / 400)
    assert low < 0.75 < high and abs((high - low) / 2 - half) < 0.2 * half
    assert pope_metrics(labels, predictions)["ci95"] == metrics["ci95"]
    rows = item_counts(labels, predictions)
    assert paired_intervals(rows, rows, metrics_from_counts)["accuracy"] == [0.0, 0.0]


def test_paired_interval_of_a_real_gain_excludes_zero():
    from eval.pope import evaluate_pope, paired_pope_changes

    questions = [{"question_id": i, "label": "yes" if i % 2 else "no"} for i in range(400)]
    plain = {q["question_id"]: "yes" for q in questions}  # half right
    better = {i: ("yes" if i % 2 or i % 10 == 0 else "no") for i in plain}  # 160 of the 200 "no" now right
    base, other = evaluate_pope(questions, plain), evaluate_pope(questions, better)
    accuracy = paired_pope_changes(base, other)["accuracy"]
    low, high = accuracy["ci95"]
    assert accuracy["change"] == pytest.approx(0.4) == other["accuracy"] - base["accuracy"]
    assert 0 < low < 0.4 < high and not accuracy["within_noise"]
    same = paired_pope_changes(base, evaluate_pope(questions, dict(plain)))
    assert same["accuracy"] == {"change": 0.0, "ci95": [0.0, 0.0], "within_noise": True} and same["n_paired"] == 400

"""COCO caption metrics (pycocoevalcap with its Java tokenizer and METEOR) on real COCO reference captions.

The METEOR jar takes a few seconds to start, so the full metric set runs once per module."""

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from eval.caption_metrics import (
    evaluate_captions,
    load_caption_results,
    spice_models_available,
    tokenize_for_coco,
    write_caption_results,
)

LLAVA_80 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini" / "caps_boxes_coco2014_val_80.jsonl"
IDENTICAL = ["a red bus parked on a city street", "a red bus parked on a city street"]
FAST = ("BLEU", "ROUGE_L", "CIDEr")  # the pure-Python scorers (only the tokenizer needs Java)

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")


@pytest.fixture(scope="module")
def mini_set():
    """References = the first 4 captions of each of the 80 LLaVA images, candidate = the 5th; plus image 0
    whose candidate equals its references."""
    if not LLAVA_80.is_file():
        pytest.skip(f"shared data not found at {LLAVA_80}")
    records = [json.loads(line) for line in LLAVA_80.read_text().splitlines()]
    references = {int(r["id"]): r["captions"][:4] for r in records}
    candidates = {int(r["id"]): r["captions"][4] for r in records}
    references[0], candidates[0] = IDENTICAL, IDENTICAL[0]
    return references, candidates


@pytest.fixture(scope="module")
def full_result(mini_set):
    return evaluate_captions(*mini_set)


def test_all_metrics_present_and_sane(full_result):
    metrics = full_result["metrics"]
    assert set(metrics) >= {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    assert full_result["n_images"] == 81
    # a human caption scored against four others: typical COCO human-agreement values
    assert 1 > metrics["Bleu_1"] > metrics["Bleu_2"] > metrics["Bleu_3"] > metrics["Bleu_4"] > 0.1
    assert 0.15 < metrics["METEOR"] < 0.4 and 0.35 < metrics["ROUGE_L"] < 0.6 and 0.5 < metrics["CIDEr"] < 1.5
    # the identical image: METEOR, ROUGE-L and BLEU per image are 1
    assert full_result["per_image"][0]["METEOR"] == pytest.approx(1.0)
    assert full_result["per_image"][0]["ROUGE_L"] == pytest.approx(1.0)
    assert full_result["per_image"][0]["Bleu_4"] == pytest.approx(1.0)
    if spice_models_available():
        assert "SPICE" in metrics
    else:
        assert "SPICE" not in metrics and "SPICE skipped" in full_result["notes"][0]


def test_deterministic(mini_set, full_result):
    again = evaluate_captions(*mini_set, scorers=FAST)
    for name, value in again["metrics"].items():
        assert value == full_result["metrics"][name], name


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_bleu1_and_rouge_against_hand_formulas(mini_set, full_result):
    """Corpus BLEU-1 and ROUGE-L recomputed from their definitions on the same PTB tokens."""
    references, candidates = tokenize_for_coco(*mini_set)
    matched = guessed = closest_total = 0
    rouge_scores = []
    for key, (candidate,) in candidates.items():
        words = candidate.split()
        refs = [r.split() for r in references[key]]
        max_counts = Counter()
        for ref in refs:
            max_counts |= Counter(ref)
        matched += sum(min(n, max_counts[w]) for w, n in Counter(words).items())  # clipped unigram matches
        guessed += len(words)
        closest_total += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]  # closest reference length
        # ROUGE-L (pycocoevalcap): best LCS precision and recall over references, F with beta = 1.2; it splits
        # on " " only (PTB joins "22 3/4" with a no-break space into one token, which str.split() would cut)
        words, refs = candidate.split(" "), [r.split(" ") for r in references[key]]
        precision = max(lcs(words, r) / len(words) for r in refs)
        recall = max(lcs(words, r) / len(r) for r in refs)
        rouge_scores.append(0.0 if not precision * recall else
                            (1 + 1.2**2) * precision * recall / (recall + 1.2**2 * precision))
    brevity = 1.0 if guessed >= closest_total else math.exp(1 - closest_total / guessed)
    assert full_result["metrics"]["Bleu_1"] == pytest.approx(brevity * matched / guessed, rel=1e-6)
    assert full_result["metrics"]["ROUGE_L"] == pytest.approx(sum(rouge_scores) / len(rouge_scores), rel=1e-9)


def test_identical_candidates_score_perfectly():
    references = {1: ["A cat sits on a mat."], 2: ["Two dogs play in the park!"]}
    candidates = {1: "a cat sits on a mat", 2: "Two dogs play in the park."}  # case/punctuation are tokenised away
    result = evaluate_captions(references, candidates, scorers=FAST)
    for n in range(1, 5):
        assert result["metrics"][f"Bleu_{n}"] == pytest.approx(1.0)
    assert result["metrics"]["ROUGE_L"] == pytest.approx(1.0)
    # CIDEr-D = 10 x mean over n of the tf-idf cosine (1 here) x the length penalty (exp(0) = 1)
    assert result["metrics"]["CIDEr"] == pytest.approx(10.0)


def test_errors():
    with pytest.raises(KeyError, match="no reference"):
        evaluate_captions({1: ["a cat"]}, {2: "a cat"}, scorers=FAST)
    with pytest.raises(ValueError, match="unknown caption scorers"):
        evaluate_captions({1: ["a cat"]}, {1: "a cat"}, scorers=("BLEURT",))
    if not spice_models_available():
        with pytest.raises(FileNotFoundError, match="SPICE"):
            evaluate_captions({1: ["a cat"]}, {1: "a cat"}, spice=True)


def test_file_formats(tmp_path):
    results = tmp_path / "results.json"
    write_caption_results(results, {42: "a dog", 7: "a cat"})
    expected = [{"image_id": 42, "caption": "a dog"}, {"image_id": 7, "caption": "a cat"}]
    assert json.loads(results.read_text()) == expected
    assert load_caption_results(results) == {42: "a dog", 7: "a cat"}
    results.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    with pytest.raises(ValueError, match="repeats image_id 1"):
        load_caption_results(results)

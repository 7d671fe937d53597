"""VQA normalisation and VQAv2 soft accuracy against hand-worked values."""

import pytest

from eval.vqa import normalize_vqa_answer, vqa_accuracy, vqa_exact_match, vqa_soft_accuracy


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),  # number words -> digits
        ("None", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("The red ball.", "red ball"),  # article dropped, final period deleted
        ("2.5", "2.5"),  # a period before a digit stays
        ("yes!", "yes"),  # "!" not touching a space -> space, then split
        ("black/white", "black white"),
        ("black / white", "black white"),  # touching a space -> deleted
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("a, b", "b"),  # ", " deleted, then the article "a" dropped
        ("dont", "don't"),  # apostrophe-less contraction restored
        ("youre", "you're"),
        ("it's", "it's"),  # apostrophes are not punctuation in the current official list
        ("  hello\tworld\n", "hello world"),
    ],
)
def test_normalize(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


HUMANS = ["2"] * 3 + ["3"] * 7


@pytest.mark.parametrize(
    "prediction, humans, expected",
    [
        # 3 humans said "2": leaving one of them out leaves 2 matches (2/3), leaving out a "3" leaves 3 (1)
        # -> (3 * 2/3 + 7 * 1) / 10 = 0.9
        ("two", HUMANS, 0.9),
        ("3", HUMANS, 1.0),  # 6 or 7 matches in every subset
        ("4", HUMANS, 0.0),
        # one match: 0 when its human is left out, 1/3 otherwise -> 9 * (1/3) / 10 = 0.3
        ("cat", ["cat"] + ["dog"] * 9, 0.3),
        # two matches: 1/3 twice, 2/3 eight times -> (2/3 + 16/3) / 10 = 0.6
        ("cat", ["cat"] * 2 + ["dog"] * 8, 0.6),
        ("Yes.", ["yes"] * 10, 1.0),
        # official quirk: human answers are only punctuation-processed when they disagree, so ten identical
        # un-normalised "yes." never match the normalised prediction "yes"
        ("yes", ["yes."] * 10, 0.0),
        # they disagree -> "yes." becomes "yes": 9 matches, every leave-one-out subset keeps >= 8 -> 1.0
        ("yes", ["yes."] * 9 + ["no"], 1.0),
    ],
)
def test_soft_accuracy(prediction, humans, expected):
    assert vqa_soft_accuracy(prediction, humans) == pytest.approx(expected)


def test_exact_match_and_mean():
    assert vqa_exact_match("The Circle.", "circle") == 1.0
    assert vqa_exact_match("circles", "circle") == 0.0
    result = vqa_accuracy(["two", "Circle", "red"], [HUMANS, "circle", "blue"])
    assert result["per_question"] == pytest.approx([0.9, 1.0, 0.0])
    assert result["accuracy"] == pytest.approx(1.9 / 3) and result["n"] == 3
    with pytest.raises(ValueError, match="2 predictions but 1"):
        vqa_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one human"):
        vqa_soft_accuracy("a", [])

"""VQA accuracy with the official VQA normalisation (``GT-Vision-Lab/VQA`` ``vqaEval.py``, current version).

Normalising an answer (:func:`normalize_vqa_answer`) does, in order:

1. newlines and tabs become spaces, outer spaces are stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space
   (or when the text has a digit-comma-digit group), and replaced by a space otherwise; then every ``.`` not
   followed by a digit is deleted (so "2.5" survives, "yes." becomes "yes");
3. lower-case, split on whitespace, number words ``none``/``zero``..``ten`` become digits, the articles
   ``a``/``an``/``the`` are dropped, and apostrophe-less contractions are restored ("dont" -> "don't").

:func:`vqa_soft_accuracy` is the VQAv2 score of one prediction against the 10 human answers: for each human, the
other 9 answers are a subset and the subset score is ``min(#matches / 3, 1)``; the score is the mean over the 10
subsets (equivalently ``min(k/3, 1)`` averaged over leave-one-out counts). As in the official script, the
prediction is fully normalised while the human answers, which VQA ships already normalised, only get the
punctuation step, and only when they disagree. :func:`vqa_exact_match` compares two fully normalised answers, for
single-answer datasets such as easy-VQA.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCTUATION = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is written "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) look-ahead that never
# blocks, so the effective rule is "a period not followed by a digit".
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Contractions written without apostrophes -> standard spelling (the official table, minus its four keys
# with capitals, which can never match lower-cased text).
_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd",
    'howll': "how'll", 'hows': "how's", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've",
    'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll", 'somebodys': "somebody's",
    'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll",
    'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd",
    'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma_digit = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        # The official rule tests the *input* text for each mark but edits the running output.
        if mark + " " in text or " " + mark in text or has_digit_comma_digit:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA normalisation of an answer (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def vqa_exact_match(prediction: str, answer: str) -> float:
    """1.0 when both answers are equal after :func:`normalize_vqa_answer`, else 0.0."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answer))


def vqa_soft_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction: mean over leave-one-human-out subsets of ``min(#matches / 3, 1)``."""
    if not human_answers:
        raise ValueError("VQA soft accuracy needs at least one human answer")
    predicted = normalize_vqa_answer(prediction)
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [_process_punctuation(answer) for answer in humans]
    matches = sum(answer == predicted for answer in humans)
    # Leaving out a matching human leaves matches - 1 matches among the others; leaving out another leaves all.
    subset_scores = [min(1.0, (matches - (answer == predicted)) / 3) for answer in humans]
    return sum(subset_scores) / len(subset_scores)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str] | str]) -> dict:
    """Mean accuracy over questions. Each ``answers`` entry is a list of human answers (VQAv2 soft accuracy)
    or a single string (exact match). Returns ``{"accuracy", "n", "per_question"}``; accuracy in [0, 1]."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer entries")
    if not predictions:
        raise ValueError("VQA accuracy needs at least one question")
    scores = [
        vqa_exact_match(p, a) if isinstance(a, str) else vqa_soft_accuracy(p, a)
        for p, a in zip(predictions, answers)
    ]
    return {"accuracy": sum(scores) / len(scores), "n": len(scores), "per_question": scores}

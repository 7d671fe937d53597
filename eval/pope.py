"""POPE (Polling-based Object Probing Evaluation): answer parsing and metrics.

POPE asks "Is there a {object} in the image?" and scores the yes/no answers with yes as the positive class.
The numbers papers report depend on how a free-form answer is turned into yes/no, so the parsing rule is a
named *convention*:

- ``"official"`` (default; ``"llava"`` is the same rule): ``AoiDragon/POPE:evaluate.py`` and
  ``haotian-liu/LLaVA:llava/eval/eval_pope.py``. Keep the text before the first ``.``, delete ``,``, split on
  single spaces; the answer is *no* when a word equals ``No``, ``not`` or ``no``, otherwise *yes* (so empty or
  off-topic answers count as yes, "NO" is not caught and newlines do not separate words).
- ``"opera"`` (``"pai"`` is the same rule): ``shikiw/OPERA:pope_eval.py::recorder``. Delete every ``.`` and ``,``
  of the whole answer (not only the first sentence), split on spaces; *no* when a word is ``No``, ``not``,
  ``no`` or ``NO`` or ends with ``n't``.
- ``"vcd"``: ``DAMO-NLP-SG/VCD:experiments/eval/eval_pope.py``. Lower-case and strip, then a substring test
  that depends on the label: for a "yes" question the answer is yes iff it contains ``yes``; for a "no"
  question it is no iff it contains ``no`` (so "not", "know", "snow" count as no). Needs the label.
- ``"lmms_eval"``: ``lmms-eval:lmms_eval/tasks/pope/utils.py``. Exact match after lower-case + strip; any
  other answer ("yes.", "Yes, there is") is *unparsed*: it is wrong for accuracy and drops out of precision and
  recall. (lmms-eval's own yes-ratio aggregate returns the ground-truth ratio; this module always reports the
  *predicted* yes-ratio, as the POPE paper defines it.)

Question files are the official JSON Lines (``question_id``, ``image``, ``text``, ``label``), read with
:func:`data.pope.read_pope_file`. Answer files are JSON Lines with ``question_id`` and the answer in ``answer``
(POPE) or ``text`` (LLaVA); see :func:`load_pope_answers`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from data.jsonl import DataFormatError, read_jsonl

from .stats import bootstrap_intervals, paired_changes, ratio

YES, NO = "yes", "no"

# SHA-256 of the clean question files (AoiDragon/POPE@109985c, unchanged at HEAD 08d957b).
KNOWN_POPE_FILES = {
    "ac25245170b975a5bdf9080b23fd431dfe6be458bc038259c1f4f09a6bef7994": "AoiDragon/POPE@109985c coco random",
    "72c1a8ad45d0c13514f5f22598261df41d3b533854d29682e924db50ed8aa753": "AoiDragon/POPE@109985c coco popular",
    "420b3407db1fa9f1187a805dca41cb7b97fd91504e6c2179706188c107fb8ef8": "AoiDragon/POPE@109985c coco adversarial",
}

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _parse_official(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return NO if any(word in ("No", "not", "no") for word in words) else YES


def _parse_opera(text: str) -> str:
    words = text.replace(".", "").replace(",", "").split(" ")
    negative = any(word in ("No", "not", "no", "NO") or word.endswith("n't") for word in words)
    return NO if negative else YES


def _parse_vcd(text: str, label: str | None) -> str:
    if label not in (YES, NO):
        raise ValueError("the 'vcd' POPE convention decides from the label: pass label='yes' or label='no'")
    text = text.lower().strip()
    if label == YES:
        return YES if "yes" in text else NO
    return NO if "no" in text else YES


def _parse_lmms_eval(text: str) -> str | None:
    text = text.lower().strip()
    return text if text in (YES, NO) else None


CONVENTIONS = ("official", "llava", "opera", "pai", "vcd", "lmms_eval")
_ALIASES = {"llava": "official", "pai": "opera"}


def parse_pope_answer(text: str, convention: str = "official", label: str | None = None) -> str | None:
    """Turn a model answer into ``"yes"``, ``"no"`` or ``None`` (unparsed; only the ``lmms_eval`` convention).

    ``convention`` is one of :data:`CONVENTIONS` (see the module docstring); ``label`` (the question's
    ground-truth ``"yes"``/``"no"``) is needed only by ``"vcd"``, whose rule depends on it.
    """
    name = _ALIASES.get(convention, convention)
    if name == "official":
        return _parse_official(text)
    if name == "opera":
        return _parse_opera(text)
    if name == "vcd":
        return _parse_vcd(text, label)
    if name == "lmms_eval":
        return _parse_lmms_eval(text)
    raise ValueError(f"unknown POPE convention {convention!r}; choose one of {CONVENTIONS}")


COUNTS = ("tp", "fp", "tn", "fn", "unparsed")


def metrics_from_counts(sums: np.ndarray) -> dict[str, np.ndarray]:
    """(B, 5) summed tp, fp, tn, fn, unparsed -> the five metrics, each (B,). Undefined ratios (e.g. precision
    with no "yes" prediction) are 0.0, as lmms-eval reports them; the official script would raise
    ZeroDivisionError. Unparsed answers count as wrong."""
    tp, fp, tn, fn, unparsed = sums.T
    n = tp + fp + tn + fn + unparsed
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"accuracy": ratio(tp + tn, n), "precision": precision, "recall": recall,
            "f1": ratio(2 * precision * recall, precision + recall), "yes_ratio": ratio(tp + fp, n)}


def item_counts(labels: Sequence[str], predictions: Sequence[str | None]) -> np.ndarray:
    """(n, 5) one-hot tp / fp / tn / fn / unparsed per question (positive class = yes)."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if not labels:
        raise ValueError("POPE metrics need at least one question")
    rows = np.zeros((len(labels), len(COUNTS)))
    for index, (label, prediction) in enumerate(zip(labels, predictions)):
        if label not in (YES, NO):
            raise ValueError(f"label #{index} is {label!r}; expected 'yes' or 'no'")
        if prediction not in (YES, NO, None):
            raise ValueError(f"prediction #{index} is {prediction!r}; expected 'yes', 'no' or None")
        outcome = "unparsed" if prediction is None else ("tp" if label == YES else "fp") if prediction == YES \
            else ("tn" if label == NO else "fn")
        rows[index, COUNTS.index(outcome)] = 1
    return rows


def pope_metrics(labels: Sequence[str], predictions: Sequence[str | None]) -> dict:
    """Accuracy, precision, recall, F1 and predicted yes-ratio for one split (positive class = yes).

    ``labels`` are ``"yes"``/``"no"``; ``predictions`` are ``"yes"``, ``"no"`` or ``None`` (unparsed: counted
    wrong for accuracy, outside TP/FP/TN/FN). Returns the five metrics as fractions in [0, 1], the counts
    ``n``, ``tp``, ``fp``, ``tn``, ``fn``, ``unparsed``, and ``ci95``: each metric's 95% bootstrap interval
    over the questions (``eval.stats``).
    """
    rows = item_counts(labels, predictions)
    totals = rows.sum(0)
    point = {name: float(value[0]) for name, value in metrics_from_counts(totals[None]).items()}
    return {**point, "n": len(labels), **{name: int(count) for name, count in zip(COUNTS, totals)},
            "ci95": bootstrap_intervals(rows, metrics_from_counts)}


def evaluate_pope(
    questions: Sequence[Mapping], answers_by_id: Mapping, convention: str = "official"
) -> dict:
    """Score one POPE split: parse each question's answer with ``convention`` and compute :func:`pope_metrics`.

    ``questions``: dicts with ``question_id`` and ``label`` (as :func:`data.pope.read_pope_file` returns them);
    ``answers_by_id``: ``{question_id: answer text}``. Every question needs an answer. Returns the metrics
    dict with ``convention`` added.
    """
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers_by_id]
    if missing:
        raise KeyError(f"{len(missing)} POPE questions have no answer, e.g. question_id {missing[:5]}")
    labels = [q["label"] for q in questions]
    predictions = [
        parse_pope_answer(answers_by_id[q["question_id"]], convention, label=q["label"]) for q in questions
    ]
    outcomes = item_counts(labels, predictions).argmax(1)
    return {**pope_metrics(labels, predictions), "convention": convention,
            # each question's tp / fp / tn / fn / unparsed, for paired comparisons of two runs
            "per_question": {q["question_id"]: COUNTS[outcome] for q, outcome in zip(questions, outcomes)}}


def paired_pope_changes(base: Mapping, other: Mapping) -> dict:
    """Each metric's change from `base` to `other` (`evaluate_pope` results) over the questions both scored, with
    its paired 95% interval (`eval.stats.paired_changes`); `n_paired` counts those questions."""
    shared = [key for key in base["per_question"] if key in other["per_question"]]
    rows = [np.eye(len(COUNTS))[[COUNTS.index(result["per_question"][key]) for key in shared]] for result in (base, other)]
    return {**paired_changes(rows[0], rows[1], metrics_from_counts), "n_paired": len(shared)}


def average_over_splits(per_split: Mapping[str, Mapping]) -> dict:
    """Mean of each of :data:`METRIC_NAMES` over splits (the "average" row of POPE tables)."""
    if not per_split:
        raise ValueError("no POPE splits to average")
    return {name: sum(m[name] for m in per_split.values()) / len(per_split) for name in METRIC_NAMES}


def evaluate_pope_splits(
    splits: Mapping[str, tuple[Sequence[Mapping], Mapping]], convention: str = "official"
) -> dict:
    """Score several splits, e.g. ``{"random": (questions, answers_by_id), "popular": ..., ...}``.

    Question ids restart at 1 in every official split file, so each split carries its own answers.
    Returns ``{"convention", "splits": {name: metrics}, "average": {metric: mean over splits}}``.
    """
    per_split = {name: evaluate_pope(qs, answers, convention) for name, (qs, answers) in splits.items()}
    return {"convention": convention, "splits": per_split, "average": average_over_splits(per_split)}


def load_pope_answers(path: str | Path, answer_keys: Sequence[str] = ("answer", "text")) -> dict:
    """Read an answer file (JSON Lines with ``question_id`` and the answer text) into ``{question_id: text}``.

    The answer is taken from the first key of ``answer_keys`` present (POPE writes ``answer``, LLaVA ``text``).
    """
    answers = {}
    for number, record in enumerate(read_jsonl(path), start=1):
        key = next((k for k in answer_keys if k in record), None)
        if "question_id" not in record or key is None:
            raise DataFormatError(f"{path}: answer {number} needs 'question_id' and one of {list(answer_keys)}")
        answers[record["question_id"]] = record[key]
    return answers


def pope_file_version(path: str | Path) -> dict:
    """SHA-256 of a question file and, when it is a known release, its name (to state in every report)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return {"sha256": digest, "version": KNOWN_POPE_FILES.get(digest, "unknown")}

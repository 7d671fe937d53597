"""COCO caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) and, when possible, SPICE.

The pipeline is the one of ``pycocoevalcap.eval.COCOEvalCap``: the Stanford PTBTokenizer (a Java jar shipped in
the ``pycocoevalcap`` wheel) lower-cases, tokenises and strips punctuation from references and candidates, then
each scorer runs on the tokenised text. METEOR also runs a bundled jar (with its paraphrase table); BLEU,
ROUGE-L and CIDEr are pure Python. Java (``java`` on ``PATH``) is required.

SPICE needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use; this module never
downloads anything: SPICE runs only when those jars are already in ``pycocoevalcap/spice/lib`` and is otherwise
skipped with a note in the result (``spice=True`` makes their absence an error instead).

Inputs are plain mappings, so any reference set works: the COCO ``captions_*.json`` files, the Karpathy test
split (``dataset_coco.json``; both read by :class:`data.coco.CocoCaptionsDataset`, see
``eval.sources.caption_set``) or the synthetic scenes' captions:
``references = {image_id: [reference captions]}``, ``candidates = {image_id: caption}``. Generated captions are
stored in the standard results format ``[{"image_id": ..., "caption": ...}]`` (:func:`write_caption_results`).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from data.jsonl import DataFormatError, read_json

BLEU_NAMES = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]
_SPICE_LIB = Path(spice_module.__file__).parent / "lib"
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_models_available() -> bool:
    """True when SPICE's Stanford CoreNLP 3.6.0 jars are installed (so SPICE would not try to download them)."""
    return all((_SPICE_LIB / jar).is_file() for jar in _SPICE_JARS)


def tokenize_for_coco(references: Mapping, candidates: Mapping) -> tuple[dict, dict]:
    """PTB-tokenise references and candidates in one Java call, as ``COCOEvalCap`` does (in two calls)."""
    # The jar reads one caption per line: collapse every kind of line break / whitespace run to one space
    # (pycocoevalcap only replaces "\n"; a "\r" would shift all later captions by a line).
    def one_line(text: str) -> dict:
        return {"caption": " ".join(text.split())}

    batch = {("ref", key): [one_line(c) for c in captions] for key, captions in references.items()}
    batch.update({("cand", key): [one_line(caption)] for key, caption in candidates.items()})
    tokenized = PTBTokenizer().tokenize(batch)
    refs = {key: tokenized[("ref", key)] for key in references}
    cands = {key: tokenized[("cand", key)] for key in candidates}
    return refs, cands


# Scorer families: name -> (factory, metric name(s) it produces). Created lazily: METEOR and SPICE start a JVM.
_SCORERS = {
    "BLEU": (lambda: Bleu(4), BLEU_NAMES),
    "METEOR": (Meteor, "METEOR"),
    "ROUGE_L": (Rouge, "ROUGE_L"),
    "CIDEr": (Cider, "CIDEr"),
    "SPICE": (lambda: spice_module.Spice(), "SPICE"),
}
DEFAULT_SCORERS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def evaluate_captions(
    references: Mapping[object, Sequence[str]],
    candidates: Mapping[object, str],
    spice: bool | None = None,
    scorers: Sequence[str] = DEFAULT_SCORERS,
) -> dict:
    """Score ``candidates`` (``{image_id: caption}``) against ``references`` (``{image_id: [captions]}``).

    Every candidate needs at least one reference; the evaluated images are the candidates' (CIDEr's document
    frequencies come from their references, as in ``COCOEvalCap``). ``spice``: ``None`` runs SPICE when its
    models are installed and skips it with a note otherwise, ``True`` requires it, ``False`` skips it.
    ``scorers`` picks scorer families among :data:`DEFAULT_SCORERS` (e.g. leave out ``"METEOR"``, whose JVM takes
    a few seconds to load its paraphrase table).

    Returns ``{"metrics": {name: score}, "per_image": {image_id: {name: score}}, "n_images", "notes"}``; scores
    are in pycocoevalcap's units (fractions; CIDEr around 0-10 with 1.0 for a typical good caption).
    """
    if not candidates:
        raise ValueError("no candidate captions to evaluate")
    missing = [key for key in candidates if not references.get(key)]
    if missing:
        raise KeyError(f"{len(missing)} candidate images have no reference captions, e.g. {missing[:5]}")
    if shutil.which("java") is None:
        raise RuntimeError("COCO caption metrics need Java (the PTB tokenizer and METEOR are jars): put java on PATH")
    unknown = [name for name in scorers if name not in _SCORERS]
    if unknown:
        raise ValueError(f"unknown caption scorers {unknown}; choose among {list(_SCORERS)}")
    notes = []
    if "SPICE" not in scorers:
        spice = False
    elif spice is None:
        spice = spice_models_available()
        if not spice:
            notes.append(
                f"SPICE skipped: Stanford CoreNLP 3.6.0 jars not found in {_SPICE_LIB} "
                "(pycocoevalcap would download them; install them there to get SPICE)"
            )
    elif spice and not spice_models_available():
        raise FileNotFoundError(f"SPICE requested but {_SPICE_JARS} are not in {_SPICE_LIB}")

    refs, cands = tokenize_for_coco({key: references[key] for key in candidates}, candidates)
    metrics: dict[str, float] = {}
    per_image: dict = {key: {} for key in cands}
    for family in scorers:
        if family == "SPICE" and not spice:
            continue
        make_scorer, names = _SCORERS[family]
        with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram statistics
            score, scores = make_scorer().compute_score(refs, cands)
        if isinstance(names, list):  # BLEU returns one score (and one per-image list) per n-gram order
            for name, corpus_score, image_scores in zip(names, score, scores):
                metrics[name] = float(corpus_score)
                for key, value in zip(cands, image_scores):
                    per_image[key][name] = float(value)
        else:
            metrics[names] = float(score)
            for key, value in zip(cands, scores):
                per_image[key][names] = value["All"]["f"] if names == "SPICE" else float(value)
    return {"metrics": metrics, "per_image": per_image, "n_images": len(cands), "notes": notes}


def load_caption_results(path: str | Path) -> dict:
    """Read a results file ``[{"image_id", "caption"}]`` into ``{image_id: caption}`` (one caption per image)."""
    records = read_json(path)
    candidates = {}
    for number, record in enumerate(records, start=1):
        if "image_id" not in record or "caption" not in record:
            raise DataFormatError(f"{path}: result {number} needs 'image_id' and 'caption'")
        if record["image_id"] in candidates:
            raise DataFormatError(f"{path}: result {number} repeats image_id {record['image_id']!r}")
        candidates[record["image_id"]] = record["caption"]
    return candidates


def write_caption_results(path: str | Path, candidates: Mapping[object, str]) -> None:
    """Write ``{image_id: caption}`` in the standard results format ``[{"image_id", "caption"}]``."""
    records = [{"image_id": key, "caption": caption} for key, caption in candidates.items()]
    Path(path).write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")

"""CHAIR (Caption Hallucination Assessment with Image Relevance; Rohrbach et al., EMNLP 2018).

A caption's object *mentions* are found with a vocabulary of surface forms; a mention whose category is not in
the image's ground-truth set is hallucinated. Over a set of captions:

- ``chair_s`` = captions with at least one hallucinated mention / captions;
- ``chair_i`` = hallucinated mentions / all mentions (mentions, not unique objects);
- ``recall``  = sum over captions of |mentioned categories & ground truth| / sum of |ground truth|;
- ``avg_len`` = mean number of tokens per caption, counted as the reference does (after merging double words,
  punctuation tokens included).

All four are fractions (papers and lmms-eval print them x 100, ``avg_len`` as is).

Caption processing follows the reference (``LisaAnne/Hallucination:utils/chair.py`` as modified by Maxlinn and
used by OPERA/VCD/PAI): lower-case, tokenise, lemmatise each word, merge two-word phrases with the double-word
table, drop "seat" when "toilet" is in the caption, then keep the words that are surface forms.

- **Exact** (``ReferenceWords``), whenever NLTK (>= 3.9) finds its ``averaged_perceptron_tagger_eng`` and
  ``wordnet`` resources (NLTK's data path or ``NLTK_DATA``; ``python -m nltk.downloader
  averaged_perceptron_tagger_eng wordnet`` fetches them): sentences split after ``.!?``, each tokenised with NLTK's
  Treebank tokeniser (what ``nltk.word_tokenize`` does inside a sentence, without needing its ``punkt_tab``
  model), the caption POS-tagged with ``nltk.pos_tag`` and every word lemmatised by WordNet with its tag's part
  of speech, as the reference does ("tied" -> tie, "seated" -> seat, "skiing" -> ski). On OPERA's released
  LLaVA-1.5 captions this reproduces the reference's CHAIR_S/CHAIR_I 45.0/12.7 (greedy), 48.8/13.9 (beam 5),
  44.6/12.8 (OPERA) exactly (``tests/test_eval_chair.py``).
- **Approximate**, without those resources (a one-line warning says so): a regular-expression tokeniser close to
  NLTK's and a noun singulariser built on ``inflect``. Words that are themselves surface forms or parts of
  double words are never changed ("bus", "tennis", "glass", "people"), and an ``inflect`` result outside the
  vocabulary gives way to dropping a final "s"/"es" when that yields a vocabulary word ("mouses" -> "mouse").
  Verbs are left alone, so "skiing" is no skis (worked examples in ``tests/test_eval_chair.py``); on OPERA's
  captions this gives 45.0/12.6, 49.0/13.8, 44.8/12.7.

Quirks of the reference that are kept because they come from its data: "motor bike" and "cheesecake" are never
detected (the synonym list spells them " motor bike" and " cheesecake" with a leading space), "train track" and
"home plate" merge into non-objects (so "train tracks" is not a train), "baby"/"adult" + animal is the animal
(not a person), "passenger jet"/"passenger train" are vehicles, "bow tie" and "toilet seat" are tie and toilet.

Vocabulary JSON (:meth:`ChairVocabulary.load`) comes in two layouts. The CHAIR layout, used by the shared
``chair_synonyms.json`` and by the synthetic scenes' ``chair_vocab.json`` (``data.shapes.chair_vocabulary``)::

    {"inverse_synonym_dict": {"kitten": "cat", "table": "dining table", ...},   # surface form -> category
     "double_word_dict": {"dining table": "dining table", "baby cat": "cat", ...},  # "w1 w2" -> merged token
     "categories": ["cat", "dining table", ...]}     # optional (other keys, e.g. "synonyms", are ignored)

which also gets the reference's "seat is not counted when toilet occurs" rule; and the generic layout::

    {"synonyms": {"kitten": "cat", ...}, "double_words": {...}, "categories": [...],   # as above
     "ignore_if_present": {"seat": ["toilet"]}}     # optional: word not counted when any listed word occurs

Surface forms and double-word keys are lower-case and singular (words are singularised before the lookup).
Ground truth is a JSON object ``{image_id: [category, ...]}`` (optionally gzip-compressed), e.g.
``coco2014_chair_gt_objects.json.gz``.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import inflect
import numpy as np

from data.jsonl import DataFormatError, read_json, read_json_records

from .stats import bootstrap_intervals, paired_changes, ratio

_INFLECT = inflect.engine()

# Tokeniser close to NLTK's Treebank word tokeniser (what nltk.word_tokenize applies per sentence): "n't" and
# the clitics 's 're 've 'll 'd 'm are separate tokens ("don't" -> do n't, "can't" -> ca n't), "cannot" is
# "can not", hyphenated words and numbers such as 3.5 or 1,000 stay whole, and every other punctuation mark is
# a token ("..." and "--" as one).
_TOKEN = re.compile(
    r"[^\W_]+?(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\bcan(?=not\b)"
    r"|[^\W_]+(?:[-.][^\W_]+|,\d+)*|\.\.\.|--|\S",
    re.IGNORECASE,
)


def tokenize_caption(caption: str) -> list[str]:
    """Lower-case a caption and split it into word and punctuation tokens (see the comment above)."""
    return [match.group().lower() for match in _TOKEN.finditer(caption)]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORDNET_POS = {"J": "a", "V": "v", "N": "n", "R": "r"}  # the first letter of a Penn tag -> WordNet's part of speech


class ReferenceWords:
    """The reference's word processing with NLTK: tokenise, POS-tag, lemmatise by tag (see the module docstring).

    `ReferenceWords.find()` gives one when NLTK and its two resources are installed, else None."""

    def __init__(self):
        from nltk.stem import WordNetLemmatizer
        from nltk.tag.perceptron import PerceptronTagger
        from nltk.tokenize import NLTKWordTokenizer

        # the tagger nltk.pos_tag uses, loaded once (pos_tag loads it again on every call)
        self._tag = PerceptronTagger().tag
        self._tokenizer, self._lemmatizer = NLTKWordTokenizer(), WordNetLemmatizer()

    @staticmethod
    def find() -> "ReferenceWords | None":
        try:
            import nltk
            from nltk.corpus import wordnet

            nltk.data.find("taggers/averaged_perceptron_tagger_eng/")
            wordnet.ensure_loaded()  # a folder or a zip, wherever NLTK looks
        except (ImportError, LookupError):
            return None
        return _reference_words(tuple(nltk.data.path))

    def words(self, caption: str) -> tuple[list[str], list[tuple[int, int]]]:
        """The caption's lemmas and, for each, its character range in the caption."""
        text = caption.lower()
        tokens, spans, start = [], [], 0
        for sentence in _SENTENCE_END.split(text):
            offset = text.index(sentence, start) if sentence else start
            for a, b in self._tokenizer.span_tokenize(sentence):
                tokens.append(sentence[a:b])
                spans.append((offset + a, offset + b))
            start = offset + len(sentence)
        tags = self._tag(tokens) if tokens else []
        lemmas = [self._lemmatizer.lemmatize(word, _WORDNET_POS.get(tag[:1], "n")) for word, tag in tags]
        return lemmas, spans


@functools.cache
def _reference_words(data_path: tuple) -> ReferenceWords:
    # one tagger (a 5.6 MB table) per NLTK data path, however many vocabularies are loaded
    return ReferenceWords()


NLTK_HINT = ("python -m nltk.downloader averaged_perceptron_tagger_eng wordnet (or point NLTK_DATA at a folder "
             "holding them)")
_warned = []


def _warn_approximate():
    if not _warned:  # once per process
        _warned.append(True)
        logging.getLogger(__name__).warning(
            "CHAIR: NLTK's tagger and WordNet were not found, so words are singularised instead of lemmatised as "
            "the reference does (CHAIR_S/CHAIR_I within ~0.2 points); for exact numbers: %s", NLTK_HINT)


class ChairVocabulary:
    """Surface forms -> categories, two-word merges and suppression rules used to find object mentions.

    Build it with :meth:`load` (either JSON format) or directly from mappings (see the module docstring).
    """

    def __init__(
        self,
        synonyms: Mapping[str, str],
        double_words: Mapping[str, str] | None = None,
        categories: Iterable[str] | None = None,
        ignore_if_present: Mapping[str, Sequence[str]] | None = None,
        exact: bool | None = None,
    ):
        # exact: the reference's NLTK word processing (True: required; None: when NLTK's resources are found)
        self.reference = None if exact is False else ReferenceWords.find()
        if exact and self.reference is None:
            raise ValueError(f"exact CHAIR needs NLTK with its tagger and WordNet: {NLTK_HINT}")
        if exact is None and self.reference is None:
            _warn_approximate()
        self.synonyms = dict(synonyms)
        self.double_words = dict(double_words or {})
        self.categories = tuple(categories) if categories is not None else tuple(sorted(set(self.synonyms.values())))
        self.ignore_if_present = {word: tuple(others) for word, others in (ignore_if_present or {}).items()}
        unknown = sorted(set(self.synonyms.values()) - set(self.categories))
        if unknown:
            raise ValueError(f"synonyms map to categories missing from 'categories': {unknown[:5]}")
        # Words the singulariser must leave alone: every word of a surface form or of a double word.
        self._protected = {part for phrase in [*self.synonyms, *self.double_words] for part in phrase.split()}
        self._singular_cache: dict[str, str] = {}

    @property
    def word_processing(self) -> str:
        """"nltk" (the reference's, exact) or "singularize" (approximate)."""
        return "nltk" if self.reference is not None else "singularize"

    @classmethod
    def load(cls, path: str | Path, exact: bool | None = None) -> ChairVocabulary:
        """Read a vocabulary JSON: the generic format or the COCO ``chair_synonyms.json``."""
        data = read_json(path)
        if "inverse_synonym_dict" in data:
            # The reference's "" -> "" entry can never match a token (tokens are never empty): drop it.
            synonyms = {surface: category for surface, category in data["inverse_synonym_dict"].items() if surface}
            return cls(
                synonyms=synonyms,
                double_words=data.get("double_word_dict"),
                categories=data.get("categories"),  # written by data.shapes.chair_vocabulary, absent for COCO
                # Reference rule: "the seat of the toilet" must not fire for chair.
                ignore_if_present={"seat": ["toilet"]}, exact=exact,
            )
        if "synonyms" not in data:
            raise ValueError(f"{path}: a CHAIR vocabulary needs a 'synonyms' field (see eval/chair.py)")
        return cls(
            synonyms=data["synonyms"],
            double_words=data.get("double_words"),
            categories=data.get("categories"),
            ignore_if_present=data.get("ignore_if_present"), exact=exact,
        )

    def singularize(self, word: str) -> str:
        """Singular form of ``word`` as a noun; vocabulary words and non-alphabetic tokens are unchanged."""
        cached = self._singular_cache.get(word)
        if cached is not None:
            return cached
        result = word
        if word not in self._protected and word.isalpha():
            candidate = _INFLECT.singular_noun(word) or word
            if candidate not in self._protected:
                # inflect knows irregular plurals but not every regular one ("mouses" -> "mous"); like
                # WordNet's morphy, prefer a plain "-s"/"-es" removal that lands on a vocabulary word.
                for suffix in ("s", "es"):
                    if word.endswith(suffix) and word[: -len(suffix)] in self._protected:
                        candidate = word[: -len(suffix)]
                        break
            result = candidate
        self._singular_cache[word] = result
        return result


@dataclass
class CaptionObjects:
    """Object mentions found in one caption.

    ``words``: the caption's tokens after singularisation and double-word merging (the reference's "raw words");
    ``spans``: for each of ``words``, its ``(start, end)`` character range in the caption;
    ``mentions``: ``(index in words, surface form, category)`` for every object word, in caption order.
    """

    words: list[str]
    spans: list[tuple[int, int]]
    mentions: list[tuple[int, str, str]]

    @property
    def categories(self) -> list[str]:
        return [category for _, _, category in self.mentions]


def extract_objects(caption: str, vocabulary: ChairVocabulary) -> CaptionObjects:
    """Find the object mentions of ``caption`` (tokenise, lemmatise, merge double words, look up)."""
    if vocabulary.reference is not None:
        words, word_spans = vocabulary.reference.words(caption)
    else:
        matches = list(_TOKEN.finditer(caption))
        words = [vocabulary.singularize(match.group().lower()) for match in matches]
        word_spans = [match.span() for match in matches]
    merged, spans = [], []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        width = 2 if i + 1 < len(words) and pair in vocabulary.double_words else 1
        merged.append(vocabulary.double_words[pair] if width == 2 else words[i])
        spans.append((word_spans[i][0], word_spans[i + width - 1][1]))
        i += width
    present = set(merged)
    ignored = {w for w, others in vocabulary.ignore_if_present.items() if w in present and present & set(others)}
    mentions = [
        (index, word, vocabulary.synonyms[word])
        for index, word in enumerate(merged)
        if word in vocabulary.synonyms and word not in ignored
    ]
    return CaptionObjects(words=merged, spans=spans, mentions=mentions)


def image_id_key(image_id: int | str) -> str:
    """Canonical ground-truth key: COCO ids as decimal strings without zero padding ("000000579664" -> "579664")."""
    text = str(image_id).strip()
    return str(int(text)) if text.isdigit() else text


def load_chair_ground_truth(path: str | Path) -> dict[str, frozenset[str]]:
    """Read ``{image_id: [category, ...]}`` JSON (``.gz`` allowed) into ``{image_id_key: frozenset}``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: CHAIR ground truth must be a JSON object {{image_id: [category, ...]}}")
    return {image_id_key(key): frozenset(objects) for key, objects in data.items()}


def load_captions(
    path: str | Path, image_id_key_name: str = "image_id", caption_key: str = "caption"
) -> list[dict]:
    """Read generated captions from a JSON list or JSON Lines file into ``[{"image_id", "caption"}]``."""
    captions = []
    for number, record in enumerate(read_json_records(path), start=1):
        if image_id_key_name not in record or caption_key not in record:
            raise DataFormatError(f"{path}: record {number} needs {image_id_key_name!r} and {caption_key!r}")
        captions.append({"image_id": record[image_id_key_name], "caption": record[caption_key]})
    return captions


def load_image_ids(path: str | Path) -> list[str]:
    """Read a fixed evaluation image-id list: a JSON list or one id per line."""
    path = Path(path)
    text = path.read_text(encoding="utf-8").strip()
    ids = json.loads(text) if text.startswith("[") else text.split()
    return [image_id_key(i) for i in ids]


def chair_from_counts(sums: np.ndarray) -> dict[str, np.ndarray]:
    """(B, 7) summed per-caption counts (captions, hallucinating captions, mentions, hallucinated mentions,
    recalled objects, ground-truth objects, words) -> CHAIR_S, CHAIR_I, recall, average length, each (B,)."""
    captions, hallucinating, mentions, hallucinated, recalled, truth, words = np.asarray(sums, dtype=np.float64).T
    return {"chair_s": ratio(hallucinating, captions), "chair_i": ratio(hallucinated, mentions),
            "recall": ratio(recalled, truth), "avg_len": ratio(words, captions)}


def paired_chair_changes(base: Mapping, other: Mapping) -> dict:
    """Each CHAIR metric's change from `base` to `other` (`evaluate_chair` results, with their `per_caption`
    details) over the images both captioned, with its paired 95% interval; `n_paired` counts those images."""
    first, second = ({str(entry["image_id"]): entry["counts"] for entry in result["per_caption"]}
                     for result in (base, other))
    shared = [key for key in first if key in second]
    changes = paired_changes(np.array([first[k] for k in shared]), np.array([second[k] for k in shared]),
                             chair_from_counts)
    return {**changes, "n_paired": len(shared)}


def evaluate_chair(
    captions: Sequence[Mapping],
    ground_truth: Mapping[str, Iterable[str]],
    vocabulary: ChairVocabulary,
    image_ids: Sequence[int | str] | None = None,
    max_new_tokens: int | None = None,
) -> dict:
    """CHAIR_S, CHAIR_I, recall and average length of ``captions`` (``[{"image_id", "caption"}]``).

    ``ground_truth`` is keyed by :func:`image_id_key` (as :func:`load_chair_ground_truth` returns it); an image
    without ground truth is an error (the reference would silently treat it as having no objects);
    ``image_ids`` restricts the evaluation to a fixed list, each of which must have a caption;
    ``max_new_tokens`` (the generation setting, e.g. 64 or 512) is recorded in the result. Returns the overall
    metrics, ``ci95`` (each metric's 95% bootstrap interval over the captions, ``eval.stats``) and
    ``per_caption`` details (mentions, hallucinated ``(surface, category)`` pairs, ground truth).
    """
    if image_ids is not None:
        wanted = [image_id_key(i) for i in image_ids]
        by_id = {image_id_key(c["image_id"]): c for c in captions}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise KeyError(f"{len(missing)} listed images have no caption, e.g. {missing[:5]}")
        captions = [by_id[i] for i in wanted]
    if not captions:
        raise ValueError("CHAIR needs at least one caption")

    rows, per_caption = [], []
    for record in captions:
        key = image_id_key(record["image_id"])
        if key not in ground_truth:
            raise KeyError(f"image {record['image_id']!r} has no CHAIR ground truth")
        truth = set(ground_truth[key])
        found = extract_objects(record["caption"], vocabulary)
        hallucinated = [(word, category) for _, word, category in found.mentions if category not in truth]
        mentioned_true = {category for category in found.categories if category in truth}
        counts = [1, int(bool(hallucinated)), len(found.mentions), len(hallucinated), len(mentioned_true), len(truth),
                  len(found.words)]  # the columns of `chair_from_counts`
        rows.append(counts)
        per_caption.append(
            {
                "image_id": record["image_id"],
                "caption": record["caption"],
                "mentioned": found.categories,
                "hallucinated": hallucinated,
                # character ranges of the hallucinated words in the caption (to mark them, e.g. in red)
                "hallucinated_spans": [found.spans[i] for i, _, c in found.mentions if c not in truth],
                "ground_truth": sorted(truth),
                "words": found.words,
                "counts": counts,
            }
        )
    n = len(captions)
    rows = np.asarray(rows, dtype=np.float64)
    point = {name: float(value[0]) for name, value in chair_from_counts(rows.sum(0)[None]).items()}
    return {
        **point,
        "ci95": bootstrap_intervals(rows, chair_from_counts),
        "n_captions": n,
        "n_mentions": int(rows[:, 2].sum()),
        "n_hallucinated_mentions": int(rows[:, 3].sum()),
        "max_new_tokens": max_new_tokens,
        "word_processing": vocabulary.word_processing,
        "per_caption": per_caption,
    }

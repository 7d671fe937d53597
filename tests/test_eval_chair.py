"""CHAIR: tokenising, singularising, double words, the reference's quirks, and the metrics by hand."""

import json
from pathlib import Path

import pytest

from eval.chair import (
    ChairVocabulary,
    evaluate_chair,
    extract_objects,
    image_id_key,
    load_captions,
    load_chair_ground_truth,
    load_image_ids,
    tokenize_caption,
)

CHAIR_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chair"
COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"


@pytest.fixture(scope="module")
def coco_vocab():
    if not CHAIR_DATA.is_dir():
        pytest.skip(f"shared CHAIR data not found at {CHAIR_DATA}")
    return ChairVocabulary.load(CHAIR_DATA / "chair_synonyms.json", exact=False)  # the approximate processing


@pytest.fixture(scope="module")
def exact_vocab():
    """The reference's NLTK word processing, with the shared NLTK_DATA folder (tagger and WordNet)."""
    import nltk

    folder = CHAIR_DATA.parent / "nltk"
    if not folder.is_dir():
        pytest.skip(f"shared NLTK data not found at {folder}")
    nltk.data.path.insert(0, str(folder))
    try:
        yield ChairVocabulary.load(CHAIR_DATA / "chair_synonyms.json", exact=True)
    finally:
        nltk.data.path.remove(str(folder))


@pytest.fixture(scope="module")
def coco_truth():
    if not CHAIR_DATA.is_dir():
        pytest.skip(f"shared CHAIR data not found at {CHAIR_DATA}")
    return load_chair_ground_truth(CHAIR_DATA / "coco2014_chair_gt_objects.json.gz")


def test_tokenizer_follows_treebank():
    tokens = tokenize_caption("Men, women & children don't care; it's the man's dog... A 3.5-inch t-shirt cannot 1,000")
    assert tokens == ["men", ",", "women", "&", "children", "do", "n't", "care", ";", "it", "'s", "the", "man",
                      "'s", "dog", "...", "a", "3.5-inch", "t-shirt", "can", "not", "1,000"]


def test_coco_vocabulary(coco_vocab):
    assert len(coco_vocab.categories) == 80
    assert len(coco_vocab.double_words) == 55
    assert "" not in coco_vocab.synonyms  # the reference's "" entry can never match and is dropped
    assert coco_vocab.synonyms[" motor bike"] == "motorcycle"  # kept as spelled: never matches a token
    assert coco_vocab.synonyms["sofa"] == "couch" and coco_vocab.synonyms["jet"] == "airplane"


@pytest.mark.parametrize(
    "plural, singular",
    [("men", "man"), ("women", "woman"), ("mice", "mouse"), ("knives", "knife"), ("geese", "goose"),
     ("calves", "calf"), ("buses", "bus"), ("benches", "bench"), ("glasses", "glass"), ("ponies", "pony"),
     ("mouses", "mouse"),  # inflect says "mous": the vocabulary-aware fallback drops the "s"
     # vocabulary words are never changed (inflect would give "bu", "tenni", "sport", "person")
     ("bus", "bus"), ("tennis", "tennis"), ("sports", "sports"), ("people", "people"), ("skis", "skis"),
     ("scissors", "scissors"), ("sheep", "sheep"), ("cattle", "cattle"), ("children", "children"),
     ("'s", "'s"), ("3", "3")],
)
def test_singularize(coco_vocab, plural, singular):
    assert coco_vocab.singularize(plural) == singular


def mentions(caption, vocabulary):
    return [(word, category) for _, word, category in extract_objects(caption, vocabulary).mentions]


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("Two men and three women near the buses.", [("man", "person"), ("woman", "person"), ("bus", "bus")]),
        ("Mice, knives and geese; oxen and people.",
         [("mouse", "mouse"), ("knife", "knife"), ("goose", "bird"), ("oxen", "cow"), ("people", "person")]),
        ("Hot dogs and teddy bears.", [("hot dog", "hot dog"), ("teddy bear", "teddy bear")]),
        ("Two wine glasses.", [("wine glass", "wine glass")]),  # singularise first, then merge
        # "baby"/"adult" + animal is the animal, not a person; alone, "baby" is a person
        ("A baby elephant and an adult giraffe hold a baby.",
         [("elephant", "elephant"), ("giraffe", "giraffe"), ("baby", "person")]),
        ("A passenger train and a passenger jet.", [("train", "train"), ("jet", "airplane")]),
        ("A man in a bow tie.", [("man", "person"), ("tie", "tie")]),
        ("A toilet seat.", [("toilet", "toilet")]),
        ("The seat of the toilet.", [("toilet", "toilet")]),  # "seat" dropped when "toilet" occurs
        ("A seat by the window.", [("seat", "chair")]),
        # leading-space quirks: " motor bike" and " cheesecake" in the synonym list never match
        ("A motor bike and a cheesecake.", []),
        ("A motor cycle.", [("motor cycle", "motorcycle")]),
        # "train track" and "home plate" merge into words that are no objects
        ("A train on the train tracks near home plate.", [("train", "train")]),
        ("A laptop computer, a cell phone and a sofa.",
         [("laptop computer", "laptop"), ("cell phone", "cell phone"), ("sofa", "couch")]),
        ("The dog's frisbee.", [("dog", "dog"), ("frisbee", "frisbee")]),
        ("A hot-dog stand.", []),  # hyphenated words stay one token, as in NLTK
    ],
)
def test_mentions(coco_vocab, caption, expected):
    assert mentions(caption, coco_vocab) == expected


# Agreement with the NLTK reference (OPERA/Maxlinn chair.py: nltk.word_tokenize, nltk.pos_tag, WordNet
# lemmatiser with the tag's part of speech): (caption, the reference's categories, the approximation's when they
# differ). The reference column is what the exact processing gives (it reproduces OPERA's logs, see below).
AGREEMENT = [
    # WordNet keeps "men", a noun lemma of its own, which is no surface form; "women" -> woman
    ("Two men and three women near the buses.", ["person", "bus"], ["person", "person", "bus"]),
    ("A cat chasing mice next to the knives.", ["cat", "mouse", "knife"], None),  # noun.exc mice/knives
    # the tagger calls "geese" an adjective, which WordNet leaves alone
    ("Geese and oxen in a field with people.", ["cow", "person"], ["bird", "cow", "person"]),
    # WordNet may lemmatise "dining" (VBG) to "dine", so the reference does not merge "dining table" and
    # counts "table" instead: same category (its Len counts one token more)
    ("Hot dogs and teddy bears on a dining table.", ["hot dog", "teddy bear", "dining table"], None),
    # WordNet: "sports" -> "sport", no "sports ball" merge, "ball" -> sports ball: same category
    ("A sports ball on the grass.", ["sports ball"], None),
    ("Two wine glasses on the table.", ["wine glass", "dining table"], None),  # "glasses" -> "glass"
    ("A baby elephant next to an adult giraffe.", ["elephant", "giraffe"], None),
    ("A motor bike parked near the train tracks.", [], None),
    ("A cheesecake on a plate.", [], None),
    ("The seat of the toilet is up.", ["toilet"], None),
    # differences: the reference tags these -ing/-ed forms as verbs and lemmatises "skiing" -> "ski" (skis),
    # "skateboarding" -> "skateboard", "seated" -> "seat" (chair); the singulariser here only handles nouns
    ("A man skiing down a slope.", ["person", "skis"], ["person"]),
    ("A boy skateboarding on a ramp.", ["person", "skateboard"], ["person"]),
    ("A woman seated at a desk.", ["person", "chair", "dining table"], ["person", "dining table"]),
]


@pytest.mark.parametrize("caption, reference, ours", AGREEMENT)
def test_agreement_with_nltk_reference(coco_vocab, exact_vocab, caption, reference, ours):
    assert extract_objects(caption, coco_vocab).categories == (reference if ours is None else ours)
    assert extract_objects(caption, exact_vocab).categories == reference


# OPERA's released LLaVA-1.5 captions of its 500 images, scored by OPERA's own chair.py (NLTK tagging and WordNet
# lemmatisation): CHAIR_S, CHAIR_I, recall x 100, rounded as papers print them
OPERA_REFERENCE = {"greedy": (45.0, 12.7, 80.4), "beam5": (48.8, 13.9, 80.3), "ours": (44.6, 12.8, 79.5)}


@pytest.mark.parametrize("log", sorted(OPERA_REFERENCE))
def test_exact_processing_reproduces_the_reference_on_operas_captions(exact_vocab, coco_truth, log):
    captions = load_captions(CHAIR_DATA / "opera_llava15" / f"{log}.jsonl")
    result = evaluate_chair(captions, coco_truth, exact_vocab)
    assert result["word_processing"] == "nltk" and result["n_captions"] == 500
    printed = tuple(round(100 * result[key], 1) for key in ("chair_s", "chair_i", "recall"))
    assert printed == OPERA_REFERENCE[log]


def test_without_nltk_resources_the_approximation_says_so(caplog, monkeypatch):
    import eval.chair as chair

    monkeypatch.setattr(chair.ReferenceWords, "find", staticmethod(lambda: None))
    monkeypatch.setattr(chair, "_warned", [])
    vocabulary = ChairVocabulary({"dog": "dog"})
    assert vocabulary.word_processing == "singularize"
    assert "nltk.downloader averaged_perceptron_tagger_eng wordnet" in caplog.text
    with pytest.raises(ValueError, match="exact CHAIR needs NLTK"):
        ChairVocabulary({"dog": "dog"}, exact=True)


def test_metrics_by_hand(coco_vocab):
    truth = {"1": {"person", "dog"}, "2": {"cat"}, "3": {"bus", "person", "car"}}
    captions = [
        # tokens: a man walks his dog . a cat watches .  (10); mentions person, dog, cat(hallucinated)
        {"image_id": 1, "caption": "A man walks his dog. A cat watches."},
        # tokens: two cats sleep .  (4); mention cat
        {"image_id": 2, "caption": "Two cats sleep."},
        # tokens: people wait for the buses , the man reads .  (10); mentions person, bus, person
        {"image_id": 3, "caption": "People wait for the buses, the man reads."},
    ]
    result = evaluate_chair(captions, truth, coco_vocab, max_new_tokens=64)
    assert result["chair_s"] == pytest.approx(1 / 3)  # one caption of three hallucinates
    assert result["chair_i"] == pytest.approx(1 / 7)  # 1 hallucinated of 3 + 1 + 3 mentions
    assert result["recall"] == pytest.approx(5 / 6)  # (2 + 1 + 2) found of (2 + 1 + 3) ground-truth objects
    assert result["avg_len"] == pytest.approx((10 + 4 + 10) / 3)
    assert result["max_new_tokens"] == 64
    first = result["per_caption"][0]
    assert first["hallucinated"] == [("cat", "cat")]
    assert [first["caption"][a:b] for a, b in first["hallucinated_spans"]] == ["cat"]
    # a fixed image-id list picks and orders the captions; zero-padded ids are the same images
    subset = evaluate_chair(captions, truth, coco_vocab, image_ids=["000000003", 2])
    assert [c["image_id"] for c in subset["per_caption"]] == [3, 2]
    assert subset["chair_s"] == 0.0 and subset["recall"] == pytest.approx(3 / 4)
    with pytest.raises(KeyError, match="no caption"):
        evaluate_chair(captions, truth, coco_vocab, image_ids=[4])
    with pytest.raises(KeyError, match="no CHAIR ground truth"):
        evaluate_chair([{"image_id": 9, "caption": "A dog."}], truth, coco_vocab)


def test_generic_vocabulary_for_synthetic_scenes(tmp_path):
    vocab_file = tmp_path / "chair_vocab.json"
    vocab_file.write_text(json.dumps({
        "categories": ["red circle", "blue square", "cup"],
        "synonyms": {"red circle": "red circle", "red disc": "red circle", "blue square": "blue square",
                     "cup": "cup", "mug": "cup"},
        "double_words": {"red circle": "red circle", "red disc": "red disc", "blue square": "blue square"},
    }))
    vocab = ChairVocabulary.load(vocab_file)
    caption = "Two red circles, a blue square and three mugs."
    assert mentions(caption, vocab) == [("red circle", "red circle"), ("blue square", "blue square"), ("mug", "cup")]
    result = evaluate_chair([{"image_id": "scene_7", "caption": caption}], {"scene_7": {"red circle", "cup"}}, vocab)
    assert (result["chair_s"], result["chair_i"], result["recall"]) == (1.0, pytest.approx(1 / 3), 1.0)
    vocab_file.write_text(json.dumps({"categories": ["cup"], "synonyms": {"mug": "cup", "disc": "circle"}}))
    with pytest.raises(ValueError, match="circle"):
        ChairVocabulary.load(vocab_file)
    vocab_file.write_text(json.dumps({"double_words": {}}))
    with pytest.raises(ValueError, match="synonyms"):
        ChairVocabulary.load(vocab_file)


def test_file_loaders(tmp_path):
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"image_id": 5, "text": "A dog."}\n\n{"image_id": 6, "text": "A cat."}\n')
    assert load_captions(jsonl, caption_key="text") == [{"image_id": 5, "caption": "A dog."},
                                                        {"image_id": 6, "caption": "A cat."}]
    with pytest.raises(ValueError, match="record 1"):
        load_captions(jsonl)  # no "caption" key
    ids = tmp_path / "ids.txt"
    ids.write_text("000000579664\n42\n")
    assert load_image_ids(ids) == ["579664", "42"]
    assert image_id_key(579664) == image_id_key("000000579664") == "579664"


def test_coco_ground_truth(coco_truth):
    assert len(coco_truth) == 123287
    assert coco_truth[image_id_key("000000579664")] == {"banana", "bowl"}
    assert coco_truth["354533"] == {"motorcycle", "person", "sheep"}


def test_reference_captions_do_not_hallucinate(coco_vocab, coco_truth):
    """The ground truth already contains every object the COCO reference captions mention, so CHAIR on the
    LLaVA 80-image reference captions must find no hallucination (a check of the extraction on real text)."""
    records = [json.loads(line) for line in (COCO_MINI / "caps_boxes_coco2014_val_80.jsonl").read_text().splitlines()]
    captions = [{"image_id": r["id"], "caption": c} for r in records for c in r["captions"]]
    result = evaluate_chair(captions, coco_truth, coco_vocab)
    assert result["n_captions"] == 401
    assert result["n_mentions"] == 601 and result["n_hallucinated_mentions"] == 0
    assert 0.4 < result["recall"] < 0.55  # single captions name about half of the ground-truth objects


def test_plots(tmp_path, coco_vocab, coco_truth):
    from PIL import Image

    from eval.plots import plot_caption_examples, plot_chair_vs_length

    truth = {"1": {"person", "dog"}, "2": {"cat"}, "3": {"bus", "person", "car"}}
    run_a = evaluate_chair([  # lengths 10, 4, 10; only the first caption hallucinates (see test_metrics_by_hand)
        {"image_id": 1, "caption": "A man walks his dog. A cat watches."},
        {"image_id": 2, "caption": "Two cats sleep."},
        {"image_id": 3, "caption": "People wait for the buses, the man reads."},
    ], truth, coco_vocab)
    run_b = evaluate_chair([{"image_id": 2, "caption": "A dog and a cat."}], truth, coco_vocab)  # 6 tokens, dog
    drawn = plot_chair_vs_length({"64 tokens": run_a, "512 tokens": run_b}, tmp_path / "chair.png", bins=2)
    assert drawn["runs"]["64 tokens"] == pytest.approx({"avg_len": 8.0, "chair_s": 100 / 3, "chair_i": 100 / 7})
    assert drawn["runs"]["512 tokens"] == pytest.approx({"avg_len": 6.0, "chair_s": 100.0, "chair_i": 50.0})
    # lengths 4..10 in two bins [4, 7) and [7, 10]: run A has 0/1 then 1/2 hallucinating; run B 1/1, then none
    assert [point for bin_ in drawn["bins"]["64 tokens"] for point in bin_] == pytest.approx([5.5, 0.0, 8.5, 50.0])
    assert [point for bin_ in drawn["bins"]["512 tokens"] for point in bin_] == pytest.approx([5.5, 100.0])
    assert (tmp_path / "chair.png").stat().st_size > 1000

    real = evaluate_chair([{"image_id": 579664, "caption": "Bananas in a bowl on a table, next to two cats."},
                           {"image_id": 354533, "caption": "A red motorcycle near sheep."}], coco_truth, coco_vocab)
    examples = [
        {**real["per_caption"][0], "image": Image.new("RGB", (64, 48), "yellow"), "title": "579664"},
        {**real["per_caption"][1], "image": COCO_MINI / "COCO_val2014_000000354533.jpg"},
    ]
    red = plot_caption_examples(examples, tmp_path / "examples.png")
    assert red == [["table", "cats"], []]  # punctuation next to a red word stays black
    assert (tmp_path / "examples.png").stat().st_size > 1000

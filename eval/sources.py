"""Where evaluation inputs come from: the official files with COCO images, or a synthetic-scenes folder.

A scenes folder is what `data.scenes.generate_scenes` writes (its layout: `data.scene_folder.ScenesFolder`).
Each function returns plain lists and dicts that the `eval.tasks` runners take.
"""

from pathlib import Path

from data.coco import CocoCaptionsDataset
from data.images import resolve_image_path
from data.jsonl import DataFormatError, read_json, read_json_records
from data.llava import llava_messages
from data.pope import POPE_STRATEGIES, image_objects, read_pope_file
from data.scene_folder import ScenesFolder
from vlm.processing import IMAGE_MARKER

from .chair import ChairVocabulary, image_id_key, load_chair_ground_truth, load_image_ids

COCO_VAL2014_FILE = "COCO_val2014_{image_id:012d}.jpg"


def pope_split_name(path) -> str:
    """"random", "popular" or "adversarial" when the file name says so (coco_pope_random.json), else its stem."""
    stem = Path(path).stem
    return next((strategy for strategy in POPE_STRATEGIES if strategy in stem.split("_")), stem)


def pope_files(paths) -> dict[str, list[dict]]:
    """Official (or any) POPE question files -> `{split name: questions}`."""
    splits = {}
    for path in paths:
        name = pope_split_name(path)
        if name in splits:
            raise ValueError(f"two POPE files give the split name {name!r}: {path}")
        splits[name] = read_pope_file(path)
    return splits


def scenes_pope(folder, split: str = "test") -> tuple[dict[str, list[dict]], Path]:
    """A scenes folder's POPE files for one split -> `({strategy: questions}, image_root)`."""
    folder = ScenesFolder(folder)
    files = [folder.pope(split, strategy) for strategy in POPE_STRATEGIES]
    folder.require(*files)
    return {strategy: read_pope_file(path) for strategy, path in zip(POPE_STRATEGIES, files)}, folder.images(split)


def scenes_chair(folder, split: str = "test"):
    """CHAIR inputs of a scenes split -> `(images [(image_id, path)], ground_truth, vocabulary)`.

    The ground truth is each image's set of shape categories (from `instances_{split}.json`); the vocabulary
    is the folder's `chair_vocab.json`."""
    folder = ScenesFolder(folder)
    instances = read_json(folder.instances(split))
    ids = {image["file_name"]: image["id"] for image in instances["images"]}
    image_root = folder.images(split)
    images, ground_truth = [], {}
    for file_name, objects in image_objects(instances):
        images.append((ids[file_name], image_root / file_name))
        ground_truth[image_id_key(ids[file_name])] = frozenset(objects)
    return images, ground_truth, ChairVocabulary.load(folder.chair_vocabulary)


def coco_chair(image_ids_file, image_root, ground_truth_file, synonyms_file, file_pattern: str = COCO_VAL2014_FILE):
    """CHAIR inputs for a fixed COCO image-id list -> `(images [(image_id, path)], ground_truth, vocabulary)`.

    `file_pattern` turns an id into a file name under `image_root` (default: COCO val2014 names)."""
    images = [(int(key), resolve_image_path(image_root, file_pattern.format(image_id=int(key))))
              for key in load_image_ids(image_ids_file)]
    return images, load_chair_ground_truth(ground_truth_file), ChairVocabulary.load(synonyms_file)


def caption_set(captions_json, image_root, split: str | None = None, image_ids=None):
    """Images and references of a COCO captions file or a Karpathy `dataset_coco.json` (with `split`, e.g.
    "test") -> `(images [(image_id, path)], references {image_id: [captions]})`, optionally only `image_ids`."""
    dataset = CocoCaptionsDataset(captions_json, image_root, split=split)
    entries = dataset.entries
    if image_ids is not None:
        wanted = {image_id_key(i) for i in image_ids}
        entries = [entry for entry in entries if image_id_key(entry["id"]) in wanted]
    return [(entry["id"], entry["path"]) for entry in entries], {entry["id"]: entry["references"] for entry in entries}


def scenes_captions(folder, split: str = "test"):
    """A scenes split's images and reference captions (see `caption_set`)."""
    folder = ScenesFolder(folder)
    return caption_set(folder.captions(split), folder.images(split))


def conversation_questions(conversations_json, image_root, skip_suffix: str = "_detail") -> list[dict]:
    """Single-turn VQA questions from LLaVA conversations: every user question with its reference answer,
    asked about the record's image on its own (`question_id` = record id + turn number).

    Records whose id ends with `skip_suffix` (the scenes' long descriptions, which CHAIR scores) are left out."""
    questions = []
    for index, record in enumerate(read_json_records(conversations_json)):
        record_id = str(record.get("id", index))
        if skip_suffix and record_id.endswith(skip_suffix):
            continue
        messages, image_files = llava_messages(record, f"{conversations_json}: record {index}")
        if len(image_files) != 1:
            continue  # single-image questions only
        path = resolve_image_path(image_root, image_files[0])
        turns = [m for m in messages if m["role"] != "system"]
        for turn, (asked, answer) in enumerate(zip(turns[::2], turns[1::2])):
            if asked["role"] != "user" or answer["role"] != "assistant":
                raise ValueError(f"{conversations_json}: record {record_id} does not alternate user/assistant")
            question = asked["content"].replace(IMAGE_MARKER, "").strip()
            questions.append({"question_id": f"{record_id}_{turn}", "image": path, "question": question,
                              "answers": answer["content"]})
    return questions


def scenes_vqa(folder, split: str = "test") -> list[dict]:
    """A scenes split's question/answer conversations as VQA questions (exact-match answers)."""
    folder = ScenesFolder(folder)
    return conversation_questions(folder.conversations(split), folder.images(split))


def easyvqa_questions(split: str = "test") -> list[dict]:
    """easy-VQA (the `easy_vqa` package) questions with their one-word answers."""
    from data.easyvqa import EasyVQADataset

    return [{"question_id": entry["id"], "image": entry["path"], "question": entry["question"],
             "answers": entry["answer"]} for entry in EasyVQADataset(split).entries]


# where other codebases put the answer text: LLaVA's model_vqa `text`, `answer`, OPERA's `caption`, VLMEvalKit's
# `prediction`, lmms-eval's logged `filtered_resps` / `resps` (lists of lists)
OUTPUT_TEXT_FIELDS = ("text", "answer", "caption", "prediction", "pred", "response", "filtered_resps", "resps")


def external_outputs(path, id_field: str) -> dict:
    """`{id: text}` from outputs another codebase wrote: JSON or JSON Lines records holding `id_field` (also
    inside lmms-eval's `doc`) and the text in the first of `OUTPUT_TEXT_FIELDS` they have (lists unwrapped)."""
    outputs = {}
    for number, record in enumerate(read_json_records(path), start=1):
        doc = record.get("doc") if isinstance(record.get("doc"), dict) else {}
        key = record.get(id_field, doc.get(id_field))
        text = next((record[field] for field in OUTPUT_TEXT_FIELDS if field in record), None)
        while isinstance(text, list) and text:
            text = text[0]
        if key is None or not isinstance(text, str):
            raise DataFormatError(f"{path}: record {number} needs {id_field!r} and an answer text (one of "
                                  f"{', '.join(OUTPUT_TEXT_FIELDS)})")
        outputs[key] = text
    return outputs

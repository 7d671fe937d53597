"""The evaluations as Python functions: answer (resumably) with a model, then score with the metric modules.

Each `run_*` function takes a model and its processor (anything with the `generate` interface and a
`VLMProcessor`), its inputs as plain lists (see `eval.sources`), an answers file to write or resume, and the
decoding settings (`generation_kwargs` for `model.generate`: `max_new_tokens`, `do_sample`, `num_beams`,
`mitigation`, ...). They return the metrics dict, with `n_errors` and the first `errors` (inputs that could
not be answered, e.g. unreadable images, which are left out of the metrics).
"""

from data.images import resolve_image_path
from vlm.processing import IMAGE_MARKER
from vlm.prompts import CHAIR_PROMPT, COCO_CAPTION_PROMPT, VQA_PROMPT_SUFFIX

from .chair import evaluate_chair
from .inference import Request
from .pope import evaluate_pope
from .runner import model_description, run_requests, split_errors
from .shards import current_shard
from .vqa import vqa_accuracy

SHOWN_ERRORS = 10


def _settings(task: str, model, model_name, prompt: str, **extra) -> dict:
    return {"task": task, "model": model_description(model, model_name), "prompt": prompt, **extra}


def with_errors(metrics: dict, errors: list[dict], answers_path) -> dict:
    return {**metrics, "n_errors": len(errors), "errors": errors[:SHOWN_ERRORS], "answers_file": str(answers_path)}


def _require_answers(answered: list, errors: list[dict], what: str):
    if not answered:
        first = errors[0]["error"] if errors else "no inputs"
        raise RuntimeError(f"no {what} could be answered; first error: {first}")


def _answer_questions(task: str, what: str, model, processor, requests: list[Request], answers_path,
                      prompt_suffix: str, generation_kwargs, batch_size: int, overwrite: bool, progress: bool,
                      model_name) -> tuple[list[dict], list[dict]]:
    """Answer (or resume answering) questions keyed by `question_id` -> `(answered, errors)`; refuses when
    nothing could be answered."""
    settings = _settings(task, model, model_name, IMAGE_MARKER + "\n{question}" + prompt_suffix)
    records = run_requests(model, processor, requests, answers_path, "question_id", settings, generation_kwargs,
                           batch_size, overwrite, progress)
    answered, errors = split_errors(records)
    _require_answers(answered, errors, what)
    return answered, errors


def run_pope(model, processor, questions: list[dict], image_root, answers_path, batch_size: int = 8,
             generation_kwargs: dict | None = None, convention: str = "official", prompt_suffix: str = "",
             overwrite: bool = False, progress: bool = False, model_name: str | None = None) -> dict:
    """Answer POPE questions (`question_id`, `image` relative to `image_root`, `text`, `label`) and score them
    with `eval.pope.evaluate_pope` under `convention`. The answers file has POPE's `question_id` + `answer`."""
    requests = [
        Request({"question_id": q["question_id"], "image": q["image"], "text": q["text"], "label": q["label"]},
                q["text"] + prompt_suffix, [resolve_image_path(image_root, q["image"])])
        for q in questions
    ]
    answered, errors = _answer_questions("pope", "POPE question", model, processor, requests, answers_path,
                                         prompt_suffix, generation_kwargs, batch_size, overwrite, progress, model_name)
    answers = {record["question_id"]: record["answer"] for record in answered}
    kept = [q for q in questions if q["question_id"] in answers]
    return with_errors(evaluate_pope(kept, answers, convention), errors, answers_path)


def caption_images(model, processor, images: list[tuple], answers_path, prompt: str = CHAIR_PROMPT,
                   batch_size: int = 8, generation_kwargs: dict | None = None, overwrite: bool = False,
                   progress: bool = False, model_name: str | None = None, task: str = "captions"):
    """Caption `images` (`(image_id, path or PIL image)` pairs) -> `(captions [{"image_id", "caption"}], errors)`."""
    requests = [Request({"image_id": image_id, **({} if hasattr(image, "mode") else {"file": str(image)})},
                        prompt, [image]) for image_id, image in images]
    settings = _settings(task, model, model_name, prompt)
    records = run_requests(model, processor, requests, answers_path, "image_id", settings, generation_kwargs,
                           batch_size, overwrite, progress)
    answered, errors = split_errors(records)
    return [{"image_id": record["image_id"], "caption": record["answer"]} for record in answered], errors


def run_chair(model, processor, images: list[tuple], ground_truth: dict, vocabulary, answers_path,
              prompt: str = CHAIR_PROMPT, batch_size: int = 8, generation_kwargs: dict | None = None,
              overwrite: bool = False, progress: bool = False, model_name: str | None = None) -> dict:
    """Caption `images` and score them with `eval.chair.evaluate_chair` (CHAIR_S, CHAIR_I, recall, length;
    `per_caption` details). Use `max_new_tokens` 64 or 512 in `generation_kwargs` for the standard regimes."""
    generation_kwargs = dict(generation_kwargs or {})
    captions, errors = caption_images(model, processor, images, answers_path, prompt, batch_size, generation_kwargs,
                                      overwrite, progress, model_name, task="chair")
    _require_answers(captions, errors, "image")
    metrics = evaluate_chair(captions, ground_truth, vocabulary, max_new_tokens=generation_kwargs.get("max_new_tokens"))
    return with_errors(metrics, errors, answers_path)


def run_captions(model, processor, images: list[tuple], references: dict, answers_path, results_path=None,
                 prompt: str = COCO_CAPTION_PROMPT, batch_size: int = 8, generation_kwargs: dict | None = None,
                 overwrite: bool = False, progress: bool = False, model_name: str | None = None,
                 spice: bool | None = None) -> dict:
    """Caption `images` and score them against `references` (`{image_id: [captions]}`) with pycocoevalcap
    (`eval.caption_metrics.evaluate_captions`, needs Java). `results_path` gets the standard
    `[{"image_id", "caption"}]` results file."""
    from .caption_metrics import evaluate_captions, write_caption_results  # pycocoevalcap: imported when needed

    captions, errors = caption_images(model, processor, images, answers_path, prompt, batch_size, generation_kwargs,
                                      overwrite, progress, model_name, task="captions")
    _require_answers(captions, errors, "image")
    candidates = {record["image_id"]: record["caption"] for record in captions}
    if results_path is not None and current_shard().is_main:
        write_caption_results(results_path, candidates)
    metrics = evaluate_captions(references, candidates, spice=spice)
    return with_errors({**metrics, "results_file": None if results_path is None else str(results_path)},
                        errors, answers_path)


def run_vqa(model, processor, questions: list[dict], answers_path, prompt_suffix: str = VQA_PROMPT_SUFFIX,
            batch_size: int = 8, generation_kwargs: dict | None = None, overwrite: bool = False,
            progress: bool = False, model_name: str | None = None) -> dict:
    """Answer VQA questions (`question_id`, `image` path or PIL image, `question`, `answers`: one reference
    string for exact match, or the human answers for VQAv2 soft accuracy) and score them with `eval.vqa`."""
    requests = [Request({"question_id": q["question_id"], "question": q["question"], "references": q["answers"]},
                        q["question"] + prompt_suffix, [q["image"]]) for q in questions]
    answered, errors = _answer_questions("vqa", "VQA question", model, processor, requests, answers_path,
                                         prompt_suffix, generation_kwargs, batch_size, overwrite, progress, model_name)
    references = {q["question_id"]: q["answers"] for q in questions}
    metrics = vqa_accuracy([r["answer"] for r in answered], [references[r["question_id"]] for r in answered])
    per_question = dict(zip((r["question_id"] for r in answered), metrics.pop("per_question")))
    return with_errors({**metrics, "per_question": per_question}, errors, answers_path)

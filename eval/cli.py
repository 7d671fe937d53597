"""`vlm caption`, `vlm ask` and `vlm eval {pope,chair,captions,vqa}`.

Inference prints one line per image (`path<TAB>caption`), or JSON Lines with `--json`; an input that fails
(missing, corrupt or oversized image, too-long prompt) is reported for that input, the others still complete,
and the exit code is 1. Evaluations write resumable answers files, `NAME_summary.json` and plots into `--out`
(see `eval.report`).
Fatal problems (no model folder, settings that differ from a previous run's answers) are raised and end the
command with one line and exit code 2 (see `vlm.cli`).
"""

import json
import sys
from pathlib import Path

import torch

from data.images import DEFAULT_MAX_PIXELS
from vlm.cli import positive_int
from vlm.processing import IMAGE_MARKER
from vlm.prompts import CHAIR_PROMPT, COCO_CAPTION_PROMPT, SHORT_CAPTION_PROMPT, VQA_PROMPT_SUFFIX

from .inference import Request, collect_image_paths, generate_answers, load_model
from .shards import current_shard


def add_model_arguments(parser, required: bool = True):
    parser.add_argument("--model", required=required, type=Path,
                        help="folder written by save_pretrained (model + processor), or any Hugging Face "
                             "image-text-to-text folder")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights dtype (auto: bfloat16 on a supporting GPU, else float32)")
    parser.add_argument("--compressed-grid", type=positive_int, default=None, metavar="N",
                        help="LookupViT towers: compressed tokens on an N x N grid (default: the model's saved grid); "
                             "the compressed stream's compute grows with N^2")


def add_generation_arguments(parser, max_new_tokens: int):
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help="answer length limit in tokens")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="> 0 samples at this temperature (default: greedy)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    group.add_argument("--num-beams", type=positive_int, default=1, help="beam search width (1: no beam search)")
    group.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    group.add_argument("--mitigation", default=None,
                       help="decode-time hallucination mitigation: vhr, pai:alpha=0.3, vcd, ... (see `vlm list mitigations`)")
    group.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                       help="refuse larger images (decompression bombs)")


def generation_kwargs_from_args(args) -> dict:
    """`model.generate` keyword arguments from the decoding options."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": args.temperature > 0}
    if kwargs["do_sample"]:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if args.mitigation:
        from vlm.mitigation import check_options, parse_mitigation_arg

        kwargs["mitigation"] = parse_mitigation_arg(args.mitigation)
        check_options(kwargs["mitigation"], args.num_beams)  # now, not after the model has loaded
    return kwargs


def _text_streamer(processor):
    from transformers import TextStreamer

    return TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)


def _load_model(args, generation_kwargs):
    """The model and processor, with the model options applied; mitigation methods the model cannot run are
    refused now, before any answer."""
    model, processor = load_model(args.model, args.device, args.dtype)
    if args.compressed_grid is not None:
        if not hasattr(model, "set_compressed_grid"):  # a Hugging Face VLM: no timm tower
            raise ValueError(f"--compressed-grid: {args.model} holds a {type(model).__name__}, whose vision tower "
                             "is not a LookupViT")
        model.set_compressed_grid(args.compressed_grid)
    if generation_kwargs.get("mitigation"):
        from vlm.mitigation import check_supported

        check_supported(model, generation_kwargs["mitigation"])
    return model, processor


def _print_record(args, record: dict, label_field: str | None) -> bool:
    """Print one result (streamed answers are already on the terminal); True when it is an error."""
    label = f"{record[label_field]}\t" if label_field else ""
    if args.json:
        print(json.dumps(record, ensure_ascii=False), flush=True)
    elif "error" in record:
        print(f"{label}error: {record['error']}", file=sys.stderr, flush=True)
    elif not args.stream:
        print(f"{label}{record['answer']}", flush=True)
    return "error" in record


def _answer_and_print(args, model, processor, requests, generation_kwargs, label_field: str | None) -> int:
    """Generate for `requests` and print each result as it comes; returns 1 when any request failed."""
    failures = 0
    if args.stream:
        streamer = _text_streamer(processor)
        for request in requests:
            if label_field:
                print(f"{request.record[label_field]}\t", end="", flush=True)
            for results in generate_answers(model, processor, [request], generation_kwargs, 1, args.max_pixels,
                                            streamer):
                if "error" in results[0]:
                    print(flush=True)  # end the line the streamer never started
                failures += _print_record(args, results[0], label_field)
        return 1 if failures else 0
    progress = len(requests) > args.batch_size and sys.stderr.isatty()
    for results in generate_answers(model, processor, requests, generation_kwargs, args.batch_size, args.max_pixels,
                                    progress=progress):
        failures += sum(_print_record(args, record, label_field) for record in results)
    return 1 if failures else 0


def _check_stream(args):
    if args.stream and args.json:
        raise ValueError("--stream prints text as it is generated; it cannot be combined with --json")
    if args.stream and args.num_beams > 1:
        raise ValueError("--stream needs greedy or sampled decoding (--num-beams 1)")


def caption_command(args) -> int:
    _check_stream(args)
    generation_kwargs = generation_kwargs_from_args(args)
    paths = collect_image_paths(args.images)
    if not paths:
        raise ValueError(f"no image files found in {', '.join(args.images)}")
    model, processor = _load_model(args, generation_kwargs)
    torch.manual_seed(args.seed)
    requests = [Request({"file": str(path)}, args.prompt, [path]) for path in paths]
    return _answer_and_print(args, model, processor, requests, generation_kwargs, "file")


def ask_command(args) -> int:
    _check_stream(args)
    generation_kwargs = generation_kwargs_from_args(args)
    model, processor = _load_model(args, generation_kwargs)
    torch.manual_seed(args.seed)
    args.batch_size = 1
    request = Request({"file": str(args.image), "question": args.question}, args.question, [args.image])
    return _answer_and_print(args, model, processor, [request], generation_kwargs, None)


# ------------------------------------------------------------------------------------------------- eval
def _add_eval_arguments(parser, max_new_tokens: int):
    add_model_arguments(parser, required=False)  # not to rescore outputs made elsewhere
    parser.add_argument("--out", required=True, type=Path, help="folder for answers, summary and plots")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images answered together")
    parser.add_argument("--max-error-rate", type=float, default=0.01,
                        help="when more of the inputs than this fraction fail (e.g. missing images), print no metric "
                             "and exit 1")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N inputs (per split)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard earlier answers in --out instead of resuming (needed when settings changed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generation_arguments(parser, max_new_tokens)


def _add_scenes_arguments(parser):
    parser.add_argument("--scenes", type=Path, help="a synthetic-scenes folder (vlm data scenes) to use instead")
    parser.add_argument("--split", default="test", help="scenes split (default: test)")


def _require(args, *names):
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        raise ValueError(f"vlm eval {args.task} needs {' and '.join(missing)} (or --scenes DIR)")


def _prompt(args, processor, option: str, key: str, default: str) -> str:
    """A prompt option as given, else the convention the model was trained with (saved with its processor), else
    the literature's default."""
    given = getattr(args, option)
    return given if given is not None else getattr(processor, "prompts", {}).get(key, default)


def _limited(items, limit):
    return items if limit is None else items[:limit]


def _run_options(args, model_name: str) -> dict:
    return {"batch_size": args.batch_size, "overwrite": args.overwrite, "progress": not args.no_progress,
            "model_name": model_name}


def _pope_eval(args, model, processor, generation_kwargs, model_name):
    from .pope import average_over_splits, pope_file_version
    from .sources import pope_files, scenes_pope
    from .tasks import run_pope

    if args.scenes:
        splits, image_root = scenes_pope(args.scenes, args.split)
        files = {}
    else:
        _require(args, "pope_files", "image_root")
        splits, image_root = pope_files(args.pope_files), args.image_root
        files = {name: {"path": str(path), **pope_file_version(path)} for name, path in zip(splits, args.pope_files)}
    per_split = {
        name: run_pope(model, processor, _limited(questions, args.limit), image_root,
                       args.out / f"pope_{name}.answers.jsonl", generation_kwargs=generation_kwargs,
                       convention=args.convention, prompt_suffix=_prompt(args, processor, "prompt_suffix", "pope_suffix", ""),
                       **_run_options(args, model_name))
        for name, questions in splits.items()
    }
    return {"convention": args.convention, "splits": per_split, "average": average_over_splits(per_split),
            "question_files": files}, {}


def _chair_eval(args, model, processor, generation_kwargs, model_name):
    from .sources import coco_chair, scenes_chair
    from .tasks import run_chair

    if args.scenes:
        images, ground_truth, vocabulary = scenes_chair(args.scenes, args.split)
    else:
        _require(args, "image_ids", "image_root", "ground_truth", "synonyms")
        images, ground_truth, vocabulary = coco_chair(args.image_ids, args.image_root, args.ground_truth,
                                                      args.synonyms, args.file_pattern)
    images = _limited(images, args.limit)
    answers = args.out / f"chair_{args.max_new_tokens}tok.answers.jsonl"
    prompt = _prompt(args, processor, "prompt", "chair", CHAIR_PROMPT)
    result = run_chair(model, processor, images, ground_truth, vocabulary, answers, prompt,
                       generation_kwargs=generation_kwargs, **_run_options(args, model_name))
    return result, dict(images)


def _captions_eval(args, model, processor, generation_kwargs, model_name):
    from .chair import load_image_ids
    from .sources import caption_set, scenes_captions
    from .tasks import run_captions

    if args.scenes:
        images, references = scenes_captions(args.scenes, args.split)
    else:
        _require(args, "references", "image_root")
        image_ids = load_image_ids(args.image_ids) if args.image_ids else None
        images, references = caption_set(args.references, args.image_root, args.karpathy_split, image_ids)
    images = _limited(images, args.limit)
    spice = {"auto": None, "on": True, "off": False}[args.spice]
    prompt = _prompt(args, processor, "prompt", "captions", COCO_CAPTION_PROMPT)
    result = run_captions(model, processor, images, references, args.out / "captions.answers.jsonl",
                          args.out / "captions_results.json", prompt,
                          generation_kwargs=generation_kwargs, spice=spice, **_run_options(args, model_name))
    return result, dict(images)


def _vqa_eval(args, model, processor, generation_kwargs, model_name):
    from .sources import conversation_questions, easyvqa_questions, scenes_vqa
    from .tasks import run_vqa

    if args.scenes:
        questions = scenes_vqa(args.scenes, args.split)
    elif args.easyvqa:
        questions = easyvqa_questions(args.easyvqa)
    else:
        _require(args, "conversations", "image_root")
        questions = conversation_questions(args.conversations, args.image_root)
    suffix = _prompt(args, processor, "prompt_suffix", "vqa_suffix", VQA_PROMPT_SUFFIX)
    result = run_vqa(model, processor, _limited(questions, args.limit), args.out / "vqa.answers.jsonl",
                     suffix, generation_kwargs=generation_kwargs, **_run_options(args, model_name))
    return result, {}


def _pope_rescore(args):
    """POPE answers another codebase wrote (one file per split, in the splits' order), under every convention."""
    from .pope import CONVENTIONS, average_over_splits, evaluate_pope
    from .sources import external_outputs, pope_files, scenes_pope
    from .tasks import with_errors

    if args.scenes:
        splits, _ = scenes_pope(args.scenes, args.split)
    else:
        _require(args, "pope_files")
        splits = pope_files(args.pope_files)
    if len(args.answers) != len(splits):
        raise ValueError(f"--answers: {len(args.answers)} files for the {len(splits)} POPE splits "
                         f"({', '.join(splits)}): give one answers file per split, in the same order")
    per_split, by_convention = {}, {convention: {} for convention in CONVENTIONS}
    for (name, questions), path in zip(splits.items(), args.answers):
        answers = external_outputs(path, "question_id")
        answered = [q for q in _limited(questions, args.limit) if q["question_id"] in answers]
        errors = [{"question_id": q["question_id"], "error": f"no answer in {path}"}
                  for q in _limited(questions, args.limit) if q["question_id"] not in answers]
        if not answered:
            raise ValueError(f"{path}: none of the {len(questions)} {name} questions has an answer there "
                             "(do its question ids belong to this split's file?)")
        per_split[name] = with_errors(evaluate_pope(answered, answers, args.convention), errors, path)
        for convention in CONVENTIONS:
            by_convention[convention][name] = evaluate_pope(answered, answers, convention)["accuracy"]
    return {"convention": args.convention, "splits": per_split, "average": average_over_splits(per_split),
            "by_convention": by_convention}, {}


def _chair_rescore(args):
    """CHAIR of captions another codebase wrote (`{"image_id", "caption"}` lines and the like)."""
    from .chair import ChairVocabulary, evaluate_chair, image_id_key, load_chair_ground_truth, load_image_ids
    from .sources import external_outputs

    _require(args, "ground_truth", "synonyms")
    captions = {image_id_key(key): text for key, text in external_outputs(args.captions, "image_id").items()}
    ground_truth = load_chair_ground_truth(args.ground_truth)
    wanted = load_image_ids(args.image_ids) if args.image_ids else sorted(captions, key=lambda k: (len(k), k))
    wanted = _limited(wanted, args.limit)
    without_truth = [key for key in wanted if key not in ground_truth]
    if without_truth:
        raise ValueError(f"{len(without_truth)} images of {args.captions} have no CHAIR ground truth in "
                         f"{args.ground_truth}, e.g. {without_truth[:3]}")
    errors = [{"image_id": key, "error": f"no caption in {args.captions}"} for key in wanted if key not in captions]
    records = [{"image_id": key, "caption": captions[key]} for key in wanted if key in captions]
    if not records:
        raise ValueError(f"{args.captions}: no caption for any of the {len(wanted)} images")
    result = evaluate_chair(records, ground_truth, ChairVocabulary.load(args.synonyms))
    return {**result, "n_errors": len(errors), "errors": errors[:10], "answers_file": str(args.captions)}, {}


def eval_command(args) -> int:
    from .report import write_report

    generation_kwargs = generation_kwargs_from_args(args)
    outputs = getattr(args, "answers", None) or getattr(args, "captions", None)
    if outputs:  # scored as they are: no model, no generation
        if args.model is not None:
            raise ValueError(f"--model and --{'answers' if args.task == 'pope' else 'captions'} exclude each other: "
                             "the outputs are scored as they are")
        result, images = args.rescore(args)
        _compare_with_baseline(args, result)
        model_name = f"outputs: {', '.join(str(path) for path in (outputs if isinstance(outputs, list) else [outputs]))}"
        summary = write_report(args.out, args.task, result, model_name, {}, images, name=args.report_name(args))
        return _print_summary(args, summary)
    if args.model is None:
        extra = {"pope": " (or --answers FILE ... to score answers made elsewhere)",
                 "chair": " (or --captions FILE to score captions made elsewhere)"}.get(args.task, "")
        raise ValueError(f"vlm eval {args.task} needs --model{extra}")
    model, processor = _load_model(args, generation_kwargs)
    torch.manual_seed(args.seed)
    model_name = str(args.model.resolve())
    result, images = args.run(args, model, processor, generation_kwargs, model_name)
    if not current_shard().is_main:  # one of several `accelerate launch` processes: the main one reports
        return 0
    _compare_with_baseline(args, result)
    summary = write_report(args.out, args.task, result, model_name, generation_kwargs, images,
                           name=args.report_name(args))
    return _print_summary(args, summary)


def _compare_with_baseline(args, result: dict) -> None:
    """With `--baseline`: each metric's paired change from that earlier run (`versus_baseline` in the result)."""
    from .report import changes_from_baseline

    if getattr(args, "baseline", None) is None:
        return
    name = args.report_name(args)
    path = args.baseline / f"{name}_details.json" if args.baseline.is_dir() else args.baseline
    if not path.is_file():
        found = sorted(p.name for p in args.baseline.glob("*_details.json")) if args.baseline.is_dir() else []
        raise FileNotFoundError(f"--baseline: {path} not found (the folder holds {found or 'no details file'}): give "
                                f"the --out folder or the {name}_details.json of an earlier vlm eval {args.task}")
    baseline = json.loads(path.read_text(encoding="utf-8"))
    result["versus_baseline"] = {"baseline": str(path), "changes": changes_from_baseline(args.task, baseline, result)}


def _print_summary(args, summary: dict) -> int:
    """The headline on stdout, unless too many inputs failed; 1 when any failed."""
    failed, total = summary["n_errors"], summary["n_errors"] + summary["n_scored"]
    if failed > args.max_error_rate * total:
        errors = summary["result"].get("errors") or next(
            (split["errors"] for split in summary["result"].get("splits", {}).values() if split["errors"]), [])
        example = f"; e.g. {errors[0].get('error')}" if errors else ""
        print(f"vlm eval {args.task}: {failed} of {total} inputs failed ({failed / total:.1%}, more than "
              f"--max-error-rate {args.max_error_rate:.1%}){example}: no metric is printed, as it would describe "
              f"the {total - failed} that could be answered; everything is in {summary['summary_file']}",
              file=sys.stderr)
        return 1
    print(json.dumps(summary["headline"], indent=1))
    print(f"summary: {summary['summary_file']}" + (f" ({failed} of {total} inputs failed)" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


def _task_parser(tasks, name: str, help_text: str, max_new_tokens: int, run, report_name=None):
    parser = tasks.add_parser(name, help=help_text, description=help_text)
    _add_eval_arguments(parser, max_new_tokens)
    _add_scenes_arguments(parser)
    parser.set_defaults(func=eval_command, run=run, report_name=report_name or (lambda args: name))
    return parser


def _add_baseline_argument(parser):
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an earlier run of this evaluation (its --out folder or details JSON), e.g. plain "
                             "decoding: each metric's change from it, with a 95%% interval paired over the same "
                             "inputs, marked within_noise when the interval holds 0")


def _register_pope(tasks):
    from .pope import CONVENTIONS

    parser = _task_parser(tasks, "pope", "POPE object-existence questions (random / popular / adversarial)", 16,
                          _pope_eval)
    parser.add_argument("--pope-files", nargs="+", type=Path, help="official question files (coco_pope_*.json)")
    parser.add_argument("--image-root", type=Path, help="folder of the COCO val2014 images")
    parser.add_argument("--convention", default="official", choices=CONVENTIONS, help="answer parsing rule")
    parser.add_argument("--prompt-suffix", default=None,
                        help="text after each question, e.g. ' Answer yes or no.' (default: the model's saved "
                             "convention, else none)")
    parser.add_argument("--answers", nargs="+", type=Path, default=None,
                        help="score answers another codebase wrote instead of a model's: one JSON (Lines) file per "
                             "split, in the order of --pope-files (LLaVA's text, VLMEvalKit's prediction, ...)")
    _add_baseline_argument(parser)
    parser.set_defaults(rescore=_pope_rescore)


def _register_chair(tasks):
    from .sources import COCO_VAL2014_FILE

    parser = _task_parser(tasks, "chair", "CHAIR object hallucination in detailed captions", 64, _chair_eval,
                          lambda args: f"chair_{args.max_new_tokens}tok")
    parser.add_argument("--image-ids", type=Path, help="fixed image-id list (JSON list or one id per line)")
    parser.add_argument("--image-root", type=Path, help="folder of the COCO images")
    parser.add_argument("--file-pattern", default=COCO_VAL2014_FILE, help="image file name from {image_id}")
    parser.add_argument("--ground-truth", type=Path, help="CHAIR ground truth (coco2014_chair_gt_objects.json.gz)")
    parser.add_argument("--synonyms", type=Path, help="CHAIR vocabulary (chair_synonyms.json)")
    parser.add_argument("--prompt", default=None, help="the instruction for each caption (default: the model's saved "
                        f"convention, else {CHAIR_PROMPT!r})")
    parser.add_argument("--captions", type=Path, default=None,
                        help="score captions another codebase wrote instead of a model's: JSON (Lines) records "
                             "with image_id and caption (or text, answer, prediction)")
    _add_baseline_argument(parser)
    parser.set_defaults(rescore=_chair_rescore)


def _register_captions(tasks):
    parser = _task_parser(tasks, "captions", "COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE)", 64,
                          _captions_eval)
    parser.add_argument("--references", type=Path, help="COCO captions_*.json or Karpathy dataset_coco.json")
    parser.add_argument("--karpathy-split", default=None, help="split of a Karpathy file (e.g. test)")
    parser.add_argument("--image-ids", type=Path, help="evaluate only these image ids")
    parser.add_argument("--image-root", type=Path, help="folder the image paths are relative to")
    parser.add_argument("--prompt", default=None, help="the instruction for each caption (default: the model's saved "
                        f"convention, else {COCO_CAPTION_PROMPT!r})")
    parser.add_argument("--spice", default="auto", choices=["auto", "on", "off"],
                        help="auto: SPICE only when its CoreNLP jars are installed")


def _register_vqa(tasks):
    parser = _task_parser(tasks, "vqa", "VQA accuracy (exact match, or VQAv2 soft accuracy)", 16, _vqa_eval)
    parser.add_argument("--easyvqa", choices=["train", "test"], help="use an easy-VQA split")
    parser.add_argument("--conversations", type=Path, help="LLaVA-format question/answer conversations")
    parser.add_argument("--image-root", type=Path, help="folder the conversations' images are relative to")
    parser.add_argument("--prompt-suffix", default=None, help="text after each question (default: the model's saved "
                        f"convention, else {VQA_PROMPT_SUFFIX!r})")


def register(subparsers):
    """Add `caption`, `ask` and `eval` to the `vlm` command line."""
    caption = subparsers.add_parser("caption", help="caption images (files or folders, searched recursively)",
                                    description="Caption images with a saved model.")
    add_model_arguments(caption)
    caption.add_argument("images", nargs="+", help="image files or folders")
    caption.add_argument("--prompt", default=SHORT_CAPTION_PROMPT,
                         help=f"instruction (default: {SHORT_CAPTION_PROMPT!r})")
    caption.add_argument("--batch-size", type=positive_int, default=8, help="images captioned together")
    caption.add_argument("--json", action="store_true", help="one JSON object per image (file, answer or error)")
    caption.add_argument("--stream", action="store_true", help="print tokens as they are generated (batch size 1)")
    add_generation_arguments(caption, max_new_tokens=64)
    caption.set_defaults(func=caption_command)

    ask = subparsers.add_parser("ask", help="ask a question about one image", description="Ask about an image.")
    add_model_arguments(ask)
    ask.add_argument("image", help="image file")
    ask.add_argument("question", help=f"the question (an {IMAGE_MARKER} marker is put in front unless it has one)")
    ask.add_argument("--json", action="store_true", help="print a JSON object (file, question, answer or error)")
    ask.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_generation_arguments(ask, max_new_tokens=128)
    ask.set_defaults(func=ask_command)

    evaluate = subparsers.add_parser("eval", help="evaluate a model: POPE, CHAIR, COCO captions, VQA",
                                     description="Resumable evaluations; answers, summary and plots go to --out.")
    tasks = evaluate.add_subparsers(dest="task", metavar="TASK", required=True)
    _register_pope(tasks)
    _register_chair(tasks)
    _register_captions(tasks)
    _register_vqa(tasks)

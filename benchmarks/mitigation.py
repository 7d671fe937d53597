"""Measured effect of each mitigation method: POPE (adversarial) and CHAIR on a scenes folder, plus the
decode-time cost per token against plain greedy decoding.

    python -m benchmarks.mitigation --model runs/tiny --scenes runs/scenes [--split test] [--out bench.json]
    python -m benchmarks.mitigation --hf-families llava qwen2_vl --threads 1 --rounds 10

POPE: accuracy, F1 and yes-ratio (`eval.pope`, official parsing). CHAIR: CHAIR_S, CHAIR_I, recall and
length in words (`eval.chair`) of "Describe the image in detail." captions. Cost: seconds per generated
token of a single-prompt greedy decode of 40 forced tokens, the median interval between consecutive tokens
(so prefill work is left out; `benchmarks.timing.time_generations`), as a ratio to plain greedy; `e2e` is the
ratio for the whole call (prefill included). Methods are timed interleaved and the fastest of several rounds
counts; use `--threads 1 --rounds 10` on a shared machine. LQCD contrasts each prompt with its leading form (the
prompt + " I am sure it is there, right?"). VAR needs sink dimensions: calibrated on the first training
images when the model folder has no `mitigation_stats.safetensors`.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.timing import GenerationTiming, print_warnings, time_generations
from vlm.processing import IMAGE_MARKER
from vlm.prompts import DETAIL_PROMPT

DEFAULT_METHODS = ["none", "vhr", "pai", "paint", "var", "vcd", "icd", "lqcd", "pai:cfg=1.1"]
CHAIR_PROMPT = f"{IMAGE_MARKER}\n{DETAIL_PROMPT}"  # what the scenes' conversations ask
COST_PROMPT = f"{IMAGE_MARKER}\nIs there a circle in the image?"
HF_BENCH_METHODS = ["none", "vhr", "pai", "var:sink_dims=0+1", "vcd", "icd", "lqcd"]


def spec_for(name: str):
    """The `mitigation=` value of a method string of the table (options as in `parse_mitigation_arg`)."""
    from vlm.mitigation import parse_mitigation_arg

    return None if name == "none" else parse_mitigation_arg(name)


def generate_texts(model, processor, prompts, images, method, max_new_tokens, batch_size):
    texts = []
    spec = spec_for(method)
    for start in range(0, len(prompts), batch_size):
        inputs = processor(images=images[start:start + batch_size], text=prompts[start:start + batch_size])
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, mitigation=spec,
                                processor=processor)
        texts += processor.batch_decode(output[:, inputs["input_ids"].shape[1]:])
    return texts


def pope_scores(model, processor, questions, image_root, method, batch_size):
    from data.images import load_image
    from eval.pope import evaluate_pope

    images = [load_image(Path(image_root) / q["image"]) for q in questions]
    prompts = [f"{IMAGE_MARKER}\n{q['text']}" for q in questions]
    answers = generate_texts(model, processor, prompts, images, method, 4, batch_size)
    metrics = evaluate_pope(questions, {q["question_id"]: a for q, a in zip(questions, answers)})
    return {"pope_acc": metrics["accuracy"], "pope_f1": metrics["f1"], "pope_yes": metrics["yes_ratio"]}


def chair_scores(model, processor, chair_inputs, method, max_new_tokens, batch_size):
    from data.images import load_image
    from eval.chair import evaluate_chair

    image_list, ground_truth, vocabulary = chair_inputs
    images = [load_image(path) for _, path in image_list]
    captions = generate_texts(model, processor, [CHAIR_PROMPT] * len(images), images, method, max_new_tokens,
                              batch_size)
    metrics = evaluate_chair([{"image_id": i, "caption": c} for (i, _), c in zip(image_list, captions)],
                             ground_truth, vocabulary)
    return {"chair_s": metrics["chair_s"], "chair_i": metrics["chair_i"], "recall": metrics["recall"],
            "length": metrics["avg_len"], "example": captions[0]}


def decode_costs(model, processor, inputs, methods, new_tokens=40, rounds=5) -> dict[str, GenerationTiming]:
    """method -> timings of forced-length greedy decodes of `new_tokens` on `inputs` (one prompt): one warm-up
    round, then `rounds` rounds with the methods interleaved in every round so that load from other processes
    hits them alike."""
    calls = {method: forced_greedy(model, processor, inputs, method, new_tokens) for method in methods}
    return time_generations(calls, repeats=rounds)


def forced_greedy(model, processor, inputs, method: str, new_tokens: int):
    """`generate(streamer=None)`: a greedy decode of exactly `new_tokens` tokens of `inputs` with `method` (a
    method string of the table, "none" for plain decoding)."""
    from vlm.mitigation import generate_with_mitigation

    spec = spec_for(method)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if spec is None:
        return lambda streamer=None: model.generate(**inputs, **kwargs, streamer=streamer)
    return lambda streamer=None: generate_with_mitigation(model, spec, processor, **inputs, **kwargs,
                                                          streamer=streamer)


def cost_columns(timing: GenerationTiming, plain: GenerationTiming) -> dict:
    """ms per decoded token and the cost against plain greedy, per token and end to end; the fastest round
    counts (the one least disturbed by other processes)."""
    return {"ms_per_token": 1000 * timing.per_token.minimum,
            "cost_per_token": timing.per_token.minimum / plain.per_token.minimum,
            "cost_e2e": timing.total.minimum / plain.total.minimum}


def ensure_stats(model, processor, scenes, split, num_images=16):
    from data.images import load_image
    from data.scene_folder import ScenesFolder
    from vlm.mitigation.calibration import calibrate_mitigation_stats, model_mitigation_stats

    if "sink_dims" in model_mitigation_stats(model):
        return "loaded"
    files = sorted(ScenesFolder(scenes).images(split).iterdir())[:num_images]
    model.mitigation_stats = calibrate_mitigation_stats(model, processor, [load_image(f) for f in files])
    return f"calibrated on {len(files)} {split} images"


TABLE_COLUMNS = ["method", "pope_acc", "pope_f1", "pope_yes", "chair_s", "chair_i", "recall", "length",
                 "ms_per_token", "cost_per_token", "cost_e2e"]


def format_table(rows: list[dict], columns: list[str] = TABLE_COLUMNS) -> str:
    """The rows as a markdown table of `columns`: floats to 3 decimals, "n/a" where a row has no value."""
    from eval.report import markdown_table

    def cell(value):
        return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    return markdown_table(columns, [[cell(row.get(column)) for column in columns] for row in rows])


def hf_family_costs(family: str, rounds: int) -> list[dict]:
    """Decode cost per token of the methods that run on Hugging Face VLMs, on a tiny random model of `family`."""
    from PIL import Image

    from vlm.hf_models import ChatProcessor
    from vlm.testing import tiny_hf_vlm

    model, hf_processor = tiny_hf_vlm(family)
    processor = ChatProcessor(hf_processor)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    inputs = processor.collate([processor.encode_prompt([{"role": "user", "content": COST_PROMPT}], [image])], [image])
    costs = decode_costs(model, processor, inputs, HF_BENCH_METHODS, rounds=rounds)
    print_warnings(*costs.values())
    return [{"family": family, "method": method, **cost_columns(timing, costs["none"])}
            for method, timing in costs.items()]


def hf_main(families: list[str], rounds: int):
    rows = [row for family in families for row in hf_family_costs(family, rounds)]
    print("| family | method | ms_per_token | cost_per_token | cost_e2e |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['method']} | {row['ms_per_token']:.2f} | {row['cost_per_token']:.3f} | "
              f"{row['cost_e2e']:.3f} |")
    return rows


def add_run_arguments(parser, pope: int, chair: int):
    """The options this benchmark shares with `benchmarks.visual_exit`: how much to score, batch, threads, timing."""
    parser.add_argument("--pope", type=int, default=pope, help="POPE adversarial questions to ask (first N)")
    parser.add_argument("--chair", type=int, default=chair, help="images to caption for CHAIR (first N)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (the fastest counts)")
    parser.add_argument("--timing-only", action="store_true", help="skip POPE and CHAIR, measure the cost only")
    parser.add_argument("--out", help="write the rows as JSON here")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved VisionLanguageModel folder with its processor")
    parser.add_argument("--scenes", help="a folder written by `vlm data scenes`")
    parser.add_argument("--hf-families", nargs="+", metavar="FAMILY",
                        help="instead: the decode cost of pai, var and vcd on tiny random Hugging Face VLMs of these "
                             "families (llava, qwen2_vl, idefics3, gemma3)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        help="method strings as for --mitigation (e.g. 'pai:alpha=0.5'); 'none' is plain decoding")
    add_run_arguments(parser, pope=300, chair=100)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="CHAIR caption length limit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.hf_families:
        return hf_main(args.hf_families, args.rounds)
    if not args.model or not args.scenes:
        parser.error("--model and --scenes are needed (or --hf-families)")

    from data.images import load_image
    from eval.sources import scenes_chair, scenes_pope

    from vlm import VisionLanguageModel, VLMProcessor

    model = VisionLanguageModel.from_pretrained(args.model).eval()
    processor = VLMProcessor.from_pretrained(args.model)
    model.generation_config.eos_token_id = processor.stop_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    print(f"stats: {ensure_stats(model, processor, args.scenes, 'train')}; "
          f"sink_dims={model.mitigation_stats['sink_dims'].tolist()}", flush=True)
    pope, image_root = scenes_pope(args.scenes, args.split)
    questions = pope["adversarial"][:args.pope]
    chair_images, ground_truth, vocabulary = scenes_chair(args.scenes, args.split)
    chair_inputs = (chair_images[:args.chair], ground_truth, vocabulary)
    cost_image = load_image(chair_images[0][1])

    rows = []
    for method in args.methods:
        started = time.perf_counter()
        row = {"method": method}
        if not args.timing_only:
            row.update(pope_scores(model, processor, questions, image_root, method, args.batch_size))
            row.update(chair_scores(model, processor, chair_inputs, method, args.max_new_tokens, args.batch_size))
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    cost_inputs = processor(images=[cost_image], text=[COST_PROMPT])
    costs = decode_costs(model, processor, cost_inputs, ["none", *[m for m in args.methods if m != "none"]],
                         rounds=args.rounds)
    print_warnings(*costs.values())
    for row in rows:
        row.update(cost_columns(costs[row["method"]], costs["none"]))
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "scenes": args.scenes, "split": args.split,
                                              "pope_questions": len(questions), "chair_images": len(chair_inputs[0]),
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

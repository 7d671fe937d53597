"""Visual-token exit per exit layer: prefill and decode time, FLOPs, POPE and CHAIR, against plain decoding.

    python -m benchmarks.visual_exit --model runs/demo/train/final --scenes runs/demo/scenes
    python -m benchmarks.visual_exit --model runs/demo/train/final --scenes runs/demo/scenes --timing-only

Time: a POPE-style request (one image, a yes/no question, 8 forced new tokens) and a CHAIR-style one (the detail
prompt, 40 forced tokens), each as a batch of `--batch-size` prompts; prefill is the time to the first token, the
decode figure the median step, `e2e` the whole call; plain and every exit layer are timed interleaved and the
fastest of `--rounds` counts (`benchmarks.timing`). FLOPs: counted by `torch.utils.flop_counter` over the whole
call (matmuls and attention; the vision tower's share is the same for every row). POPE: accuracy on the first
`--pope` adversarial questions; CHAIR on the first `--chair` test images (`benchmarks.mitigation`).
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.mitigation import CHAIR_PROMPT, chair_scores, pope_scores
from benchmarks.timing import print_warnings, time_generations
from vlm.processing import IMAGE_MARKER

POPE_PROMPT = f"{IMAGE_MARKER}\nIs there a star in the image?"


def exit_methods(num_layers: int, layers: list[int] | None) -> list[str]:
    """"none" (plain decoding) and one `exit:layer=K` per exit layer (default: every layer from 1)."""
    return ["none", *(f"exit:layer={layer}" for layer in (layers or range(1, num_layers)))]


def forced(model, processor, inputs, method, new_tokens):
    from benchmarks.mitigation import spec_for

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  mitigation=spec_for(method), processor=processor)
    return lambda streamer=None: model.generate(**inputs, **kwargs, streamer=streamer)


def call_flops(generate) -> int:
    with FlopCounterMode(display=False) as counter:
        generate()
    return counter.get_total_flops()


def timing_rows(model, processor, image, methods, batch_size, rounds) -> dict[str, dict]:
    rows = {method: {"method": method} for method in methods}
    for task, prompt, new_tokens in (("pope", POPE_PROMPT, 8), ("chair", CHAIR_PROMPT, 40)):
        inputs = processor(images=[image] * batch_size, text=[prompt] * batch_size)
        calls = {method: forced(model, processor, inputs, method, new_tokens) for method in methods}
        timings = time_generations(calls, repeats=rounds)
        print_warnings(*timings.values())
        plain = timings["none"]
        for method, timing in timings.items():
            rows[method].update({
                f"{task}_prefill_ms": 1000 * timing.prefill.minimum,
                f"{task}_decode_ms": 1000 * timing.per_token.minimum,
                f"{task}_e2e_ms": 1000 * timing.total.minimum,
                f"{task}_time": timing.total.minimum / plain.total.minimum,
                f"{task}_flops": call_flops(calls[method]) / call_flops(calls["none"]),
            })
    return rows


def format_table(rows: list[dict], with_scores: bool) -> str:
    columns = ["method", "pope_prefill_ms", "pope_decode_ms", "pope_time", "pope_flops", "chair_prefill_ms",
               "chair_decode_ms", "chair_time", "chair_flops"]
    if with_scores:
        columns += ["pope_acc", "pope_f1", "chair_s", "chair_i", "recall"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(
            f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "n/a")) for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved VisionLanguageModel folder with its processor")
    parser.add_argument("--scenes", required=True, help="a folder written by `vlm data scenes`")
    parser.add_argument("--layers", type=int, nargs="+", help="exit layers to measure (default: 1 .. depth-1)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--pope", type=int, default=600, help="POPE adversarial questions to ask (first N)")
    parser.add_argument("--chair", type=int, default=200, help="images to caption for CHAIR (first N)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (the fastest counts)")
    parser.add_argument("--timing-only", action="store_true", help="skip POPE and CHAIR")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from data.images import load_image
    from eval.sources import scenes_chair, scenes_pope
    from vlm import VisionLanguageModel, VLMProcessor

    model = VisionLanguageModel.from_pretrained(args.model).eval()
    processor = VLMProcessor.from_pretrained(args.model)
    model.generation_config.eos_token_id = processor.stop_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    methods = exit_methods(model.config.text_config.num_hidden_layers, args.layers)
    chair_images, ground_truth, vocabulary = scenes_chair(args.scenes, args.split)
    with torch.no_grad():
        rows = timing_rows(model, processor, load_image(chair_images[0][1]), methods, args.batch_size, args.rounds)
        if not args.timing_only:
            pope, image_root = scenes_pope(args.scenes, args.split)
            for method in methods:
                rows[method].update(pope_scores(model, processor, pope["adversarial"][:args.pope], image_root,
                                                method, args.batch_size))
                rows[method].update(chair_scores(model, processor, (chair_images[:args.chair], ground_truth,
                                                                    vocabulary), method, 64, args.batch_size))
                print(json.dumps(rows[method]), flush=True)
    table = format_table(list(rows.values()), not args.timing_only)
    print(f"{model.num_image_tokens} image tokens per image, {len(methods) - 1} exit layers; time and FLOPs as "
          f"ratios to plain decoding\n{table}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "scenes": args.scenes, "rows": list(rows.values())},
                                             indent=1))
    return rows


if __name__ == "__main__":
    main()

"""Visual-token exit per exit layer: prefill and decode time, FLOPs, POPE and CHAIR, against plain decoding.

    python -m benchmarks.visual_exit --model runs/demo/train/final --scenes runs/demo/scenes
    python -m benchmarks.visual_exit --model runs/demo/train/final --scenes runs/demo/scenes --timing-only
    python -m benchmarks.visual_exit --synthetic --layers 8 16 24 --batch-size 1

`--synthetic` times a random model of LLaVA-1.5's proportions instead, where the image dominates the prompt:
576 image tokens from a one-block tower, into an LLM of SmolLM2-135M's shape (30 layers, width 576); random
weights decode nonsense, so only time and FLOPs are measured.

Time: a POPE-style request (one image, a yes/no question, 8 forced new tokens) and a CHAIR-style one (the detail
prompt, 40 forced tokens), each as a batch of `--batch-size` prompts; prefill is the time to the first token, the
decode figure the median step, `e2e` the whole call; plain and every exit layer are timed interleaved and the
fastest of `--rounds` counts (`benchmarks.timing`). FLOPs: counted by `torch.utils.flop_counter` over the whole
call (matmuls and attention; the vision tower's share is the same for every row). POPE: accuracy on the first
`--pope` adversarial questions; CHAIR on the first `--chair` test images (`benchmarks.mitigation`). A model
calibrated with `python -m vlm.mitigation` (the demo's are) also gets the row `exit:layer=auto` (DyVTE's routers).
"""

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.mitigation import (CHAIR_PROMPT, add_run_arguments, chair_scores, forced_greedy, format_table,
                                   pope_scores)
from benchmarks.timing import print_warnings, time_generations
from vlm.mitigation import model_mitigation_stats
from vlm.mitigation.token_exit import ExitRouters
from vlm.processing import IMAGE_MARKER

POPE_PROMPT = f"{IMAGE_MARKER}\nIs there a star in the image?"


def exit_methods(num_layers: int, layers: list[int] | None, with_routers: bool) -> list[str]:
    """"none" (plain decoding), one `exit:layer=K` per exit layer (default: every layer from 1) and, when the model
    has trained exit routers, `exit:layer=auto`."""
    fixed = [f"exit:layer={layer}" for layer in (layers or range(1, num_layers))]
    return ["none", *fixed, *(["exit:layer=auto"] if with_routers else [])]


def call_flops(generate) -> int:
    with FlopCounterMode(display=False) as counter:
        generate()
    return counter.get_total_flops()


def timing_rows(model, processor, image, methods, batch_size, rounds) -> dict[str, dict]:
    rows = {method: {"method": method} for method in methods}
    for task, prompt, new_tokens in (("pope", POPE_PROMPT, 8), ("chair", CHAIR_PROMPT, 40)):
        inputs = processor(images=[image] * batch_size, text=[prompt] * batch_size)
        calls = {method: forced_greedy(model, processor, inputs, method, new_tokens) for method in methods}
        timings = time_generations(calls, repeats=rounds)
        print_warnings(*timings.values())
        plain, plain_flops = timings["none"], call_flops(calls["none"])
        for method, timing in timings.items():
            rows[method].update({
                f"{task}_prefill_ms": 1000 * timing.prefill.minimum,
                f"{task}_decode_ms": 1000 * timing.per_token.minimum,
                f"{task}_e2e_ms": 1000 * timing.total.minimum,
                f"{task}_time": timing.total.minimum / plain.total.minimum,
                f"{task}_flops": call_flops(calls[method]) / plain_flops,
            })
    return rows


def synthetic_model(image_tokens: int = 576):
    """A random VLM: a one-block ViT giving `image_tokens` tokens (a square grid of 16-px patches) and an LLM of
    SmolLM2-135M's shape (`HuggingFaceTB/SmolLM2-135M-Instruct`'s config, with the tiny test vocabulary)."""
    import math

    from vlm import VisionLanguageModel, VLMConfig, VLMProcessor
    from vlm.testing import TINY_CORPUS, tiny_text_config
    from vlm.tokenizer import train_tokenizer

    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ValueError(f"--image-tokens {image_tokens} must be a square number (a grid of patches)")
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TINY_CORPUS, vocab_size=256)
    text_config = tiny_text_config("llama", vocab_size=len(tokenizer), hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   max_position_embeddings=2048, tie_word_embeddings=True)
    config = VLMConfig(vision="vit_tiny_patch16_224", image_size=16 * side, text_config=text_config,
                       vision_kwargs={"img_size": 16 * side, "depth": 1, "embed_dim": 64, "num_heads": 1},
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_MARKER))
    model = VisionLanguageModel(config).eval()
    return model, VLMProcessor.from_model(model, tokenizer)


TIMING_COLUMNS = ["method", "pope_prefill_ms", "pope_decode_ms", "pope_time", "pope_flops", "chair_prefill_ms",
                  "chair_decode_ms", "chair_time", "chair_flops"]
SCORE_COLUMNS = ["pope_acc", "pope_f1", "chair_s", "chair_i", "recall"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved VisionLanguageModel folder with its processor")
    parser.add_argument("--scenes", help="a folder written by `vlm data scenes`")
    parser.add_argument("--synthetic", action="store_true",
                        help="instead: time a random model of LLaVA-1.5's proportions (no scores)")
    parser.add_argument("--image-tokens", type=int, default=576, help="image tokens of the --synthetic model")
    parser.add_argument("--layers", type=int, nargs="+", help="exit layers to measure (default: 1 .. depth-1)")
    parser.add_argument("--split", default="test")
    add_run_arguments(parser, pope=600, chair=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.synthetic and not (args.model and args.scenes):
        parser.error("--model and --scenes are needed (or --synthetic)")

    from PIL import Image

    from data.images import load_image
    from eval.sources import scenes_chair, scenes_pope
    from vlm import VisionLanguageModel, VLMProcessor

    if args.synthetic:
        model, processor = synthetic_model(args.image_tokens)
        image = Image.linear_gradient("L").convert("RGB")
    else:
        model = VisionLanguageModel.from_pretrained(args.model).eval()
        processor = VLMProcessor.from_pretrained(args.model)
        chair_images, ground_truth, vocabulary = scenes_chair(args.scenes, args.split)
        image = load_image(chair_images[0][1])
    model.generation_config.eos_token_id = processor.stop_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    routers = ExitRouters.of_model(model, model_mitigation_stats(model)) is not None
    methods = exit_methods(model.config.text_config.num_hidden_layers, args.layers, routers)
    scored = not (args.timing_only or args.synthetic)
    with torch.no_grad():
        rows = timing_rows(model, processor, image, methods, args.batch_size, args.rounds)
        if scored:
            pope, image_root = scenes_pope(args.scenes, args.split)
            for method in methods:
                rows[method].update(pope_scores(model, processor, pope["adversarial"][:args.pope], image_root,
                                                method, args.batch_size))
                rows[method].update(chair_scores(model, processor, (chair_images[:args.chair], ground_truth,
                                                                    vocabulary), method, 64, args.batch_size))
                print(json.dumps(rows[method]), flush=True)
    table = format_table(list(rows.values()), TIMING_COLUMNS + (SCORE_COLUMNS if scored else []))
    print(f"{model.num_image_tokens} image tokens per image, {len(methods) - 1} exit layers; time and FLOPs as "
          f"ratios to plain decoding\n{table}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "scenes": args.scenes, "rows": list(rows.values())},
                                             indent=1))
    return rows


if __name__ == "__main__":
    main()

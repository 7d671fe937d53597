"""The demo's evaluation on the scenes' test split: caption metrics, CHAIR, POPE (random / popular / adversarial),
VQA, then adversarial POPE and CHAIR again with each mitigation head, the decode cost of each, and where the
model looks. The prompts are the model's own conventions (`VLMProcessor.prompts`, from the recipe)."""

import json
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from data.images import load_image
from data.scene_folder import ScenesFolder
from eval.inference import user_prompt


# Options the demo gives a method instead of its defaults: the visual-token exit decides its layer with DyVTE's
# routers (trained when the heads are calibrated); its fixed default, half the depth, is measured per layer by
# `benchmarks.visual_exit` (docs/mitigation.md)
DEMO_OPTIONS = {"exit": {"layer": "auto"}}


def _detail_request(processor) -> str:
    """The model's own detail-description prompt (its CHAIR convention), with the image marker in front."""
    return user_prompt(processor.prompts["chair"], num_images=1)


def most_common_caption_baseline(scenes: Path, references: dict) -> dict:
    """Caption-agnostic baseline: the most common training caption, given for every test image."""
    from eval.caption_metrics import evaluate_captions

    captions = json.loads(ScenesFolder(scenes).captions("train").read_text())["annotations"]
    common = Counter(c["caption"] for c in captions).most_common(1)[0][0]
    result = evaluate_captions(references, {image_id: common for image_id in references})
    return {"caption": common, **result["metrics"]}


def evaluate_model(model_dir: Path, scenes: Path, out_dir: Path, mitigations: list[str], batch_size: int = 32,
                   progress: bool = True) -> dict:
    """All of step 3 on the scenes' test split; answers are resumable JSON lines under `out_dir/answers`."""
    from eval.cooccurrence import CooccurrenceProbes
    from eval.pope import average_over_splits
    from eval.sources import scenes_captions, scenes_chair, scenes_pope, scenes_vqa
    from eval.tasks import run_captions, run_chair, run_pope, run_vqa
    from vlm import VisionLanguageModel, VLMProcessor

    model = VisionLanguageModel.from_pretrained(model_dir).eval()
    processor = VLMProcessor.from_pretrained(model_dir)
    detail_prompt, caption_prompt = processor.prompts["chair"], processor.prompts["captions"]
    answers = out_dir / "answers"
    greedy = {"do_sample": False, "max_new_tokens": 8}
    caption_kwargs = {"do_sample": False, "max_new_tokens": 64}
    common = dict(batch_size=batch_size, progress=progress, model_name=str(model_dir))

    pope_splits, image_root = scenes_pope(scenes, "test")
    chair_images, chair_truth, vocabulary = scenes_chair(scenes, "test")
    caption_images, references = scenes_captions(scenes, "test")
    results = {"pope": {"convention": "official", "splits": {}}, "mitigation": {}}
    for split, questions in pope_splits.items():
        results["pope"]["splits"][split] = run_pope(model, processor, questions, image_root, answers / f"pope_{split}.jsonl",
                                          generation_kwargs=greedy, **common)
    results["pope"]["average"] = average_over_splits(results["pope"]["splits"])
    results["chair"] = run_chair(model, processor, chair_images, chair_truth, vocabulary, answers / "chair.jsonl",
                                 prompt=detail_prompt, generation_kwargs=caption_kwargs, **common)
    probes = CooccurrenceProbes.from_scenes(scenes, "test")

    def add_probes(pope_adversarial: dict, chair: dict) -> None:
        pope_adversarial["cooccurrence_probes"] = probes.pope(pope_splits["adversarial"], pope_adversarial["answers_file"])
        chair["cooccurrence_probes"] = probes.captions(chair["per_caption"])

    add_probes(results["pope"]["splits"]["adversarial"], results["chair"])
    results["captions"] = run_captions(model, processor, caption_images, references, answers / "captions.jsonl",
                                       results_path=out_dir / "captions_results.json", prompt=caption_prompt,
                                       generation_kwargs={"do_sample": False, "max_new_tokens": 40}, **common)
    results["captions"]["baseline"] = most_common_caption_baseline(scenes, references)
    results["vqa"] = run_vqa(model, processor, scenes_vqa(scenes, "test"), answers / "vqa.jsonl", prompt_suffix="",
                             generation_kwargs=greedy, **common)
    results["speed"] = {"plain": decode_speed(model, processor, chair_images[:batch_size], None)}
    for method in mitigations:
        kwargs = {"mitigation": {method: DEMO_OPTIONS.get(method, {})}}
        try:
            check_mitigation(model, processor, kwargs["mitigation"])
        except ValueError as refused:  # e.g. PAINT needs a ViT-style tower
            results["mitigation"][method] = {"refused": str(refused)}
            continue
        run = {
            "pope_adversarial": run_pope(model, processor, pope_splits["adversarial"], image_root,
                                         answers / f"pope_adversarial_{method}.jsonl",
                                         generation_kwargs={**greedy, **kwargs}, **common),
            "chair": run_chair(model, processor, chair_images, chair_truth, vocabulary, answers / f"chair_{method}.jsonl",
                               prompt=detail_prompt, generation_kwargs={**caption_kwargs, **kwargs}, **common),
        }
        add_probes(run["pope_adversarial"], run["chair"])
        results["mitigation"][method] = run
        results["speed"][method] = decode_speed(model, processor, chair_images[:batch_size], kwargs["mitigation"])
    plain_pope = results["pope"]["splits"]["adversarial"]
    if "pope_adversarial" in results["mitigation"].get("exit", {}):  # the exit at every layer: its savings and costs
        answered = {"none": plain_pope, f"exit:layer={DEMO_OPTIONS['exit']['layer']}":
                    results["mitigation"]["exit"]["pope_adversarial"]}
        results["visual_exit"] = exit_tradeoff(model, processor, pope_splits["adversarial"], image_root, answers,
                                               load_image(chair_images[0][1]), answered, greedy, common)
    if model.vision_tower.compressed_grid is not None:  # LookupViT: what each compressed grid costs and gives
        results["compressed_grid"] = grid_tradeoff(model, processor, pope_splits["adversarial"], image_root, answers,
                                                   chair_images[:batch_size], plain_pope, greedy, common)
    results["attention"] = attention_picture(model, processor, chair_images[0], vocabulary, out_dir)
    return results


@torch.no_grad()
def exit_tradeoff(model, processor, questions, image_root, answers: Path, image, answered: dict,
                  generation_kwargs: dict, options: dict) -> dict:
    """Adversarial POPE, prefill and decode time and FLOPs with the image tokens leaving at each layer (and where
    the routers decide), timed as `benchmarks.visual_exit` does on a batch of 16 copies of one test image.
    `answered`: the POPE results the demo already has (plain decoding's, the routers'), by method string."""
    from benchmarks.mitigation import spec_for
    from benchmarks.visual_exit import exit_methods, timing_rows
    from eval.tasks import run_pope

    methods = exit_methods(model.config.text_config.num_hidden_layers, None, with_routers=True)
    rows = timing_rows(model, processor, image, methods, batch_size=16, rounds=3)
    for method in methods:
        pope = answered.get(method)
        if pope is None:
            mitigation = spec_for(method)
            pope = run_pope(model, processor, questions, image_root,
                            answers / f"pope_adversarial_exit{mitigation['exit']['layer']}.jsonl",
                            generation_kwargs={**generation_kwargs, "mitigation": mitigation}, **options)
        rows[method].update(accuracy=pope["accuracy"], f1=pope["f1"])
    return rows


@torch.no_grad()
def grid_tradeoff(model, processor, questions, image_root, answers: Path, timing_images: list[tuple], own_pope: dict,
                  generation_kwargs: dict, options: dict) -> dict:
    """LookupViT's compressed grid at inference: adversarial POPE and the tower's time for a batch of images at
    each grid the demo trains with, the model's own grid restored afterwards. `own_pope`: the POPE result the
    demo already has at the model's own grid."""
    from benchmarks.timing import time_call
    from eval.tasks import run_pope

    from .recipe import LOOKUPVIT_GRIDS

    pixels = processor.preprocess_images([load_image(path) for _, path in timing_images])
    own = model.vision_tower.compressed_grid
    rows = {}
    try:
        for grid in LOOKUPVIT_GRIDS:
            model.vision_tower.set_compressed_grid(grid)
            pope = own_pope if (grid, grid) == own else run_pope(
                model, processor, questions, image_root, answers / f"pope_adversarial_grid{grid}.jsonl",
                generation_kwargs=generation_kwargs, **options)
            tower = time_call(lambda: model.get_image_features(pixels), repeats=5)
            rows[str(grid)] = {"accuracy": pope["accuracy"], "f1": pope["f1"], "tower_seconds": tower.minimum,
                               "images": len(timing_images)}
    finally:
        model.vision_tower.set_compressed_grid(own)
    return {"default": list(own), "grids": rows}


def calibrate_heads(model_dir: Path, scenes: Path, num_images: int = 32) -> None:
    """Measure the head statistics the mitigation methods need on validation images, once, beside the weights."""
    from vlm import VisionLanguageModel, VLMProcessor
    from vlm.mitigation import STATS_FILE, calibrate_mitigation_stats, save_mitigation_stats

    if (model_dir / STATS_FILE).is_file():
        return
    model = VisionLanguageModel.from_pretrained(model_dir).eval()
    processor = VLMProcessor.from_pretrained(model_dir)
    images = [load_image(path) for path in sorted(ScenesFolder(scenes).images("val").iterdir())[:num_images]]
    stats = calibrate_mitigation_stats(model, processor, images, prompt=_detail_request(processor))
    save_mitigation_stats(stats, model_dir)


@torch.no_grad()
def check_mitigation(model, processor, mitigation) -> None:
    """Raise the method's own error if it cannot run on this model (one tiny generate)."""
    inputs = processor(images=[Image.new("RGB", (8, 8))], text=[_detail_request(processor)])
    model.generate(**inputs, max_new_tokens=1, do_sample=False, mitigation=mitigation, processor=processor)


@torch.no_grad()
def decode_speed(model, processor, images: list[tuple], mitigation, new_tokens: int = 32) -> float:
    """Median seconds per decoded token (a batch of `images`, `new_tokens` forced; prefill left out), from the
    per-step timing of `benchmarks.timing` after a warm-up call."""
    from benchmarks.timing import decode_seconds_per_token

    inputs = processor(images=[load_image(path) for _, path in images],
                       text=[_detail_request(processor)] * len(images))
    kwargs = {"mitigation": mitigation, "processor": processor} if mitigation else {}
    return decode_seconds_per_token(
        lambda streamer: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, streamer=streamer, **kwargs), repeats=1)


def attention_picture(model, processor, image_entry: tuple, vocabulary, out_dir: Path) -> dict:
    """Caption one test image, find the first object word in the caption and draw where the model looked."""
    from eval.attention_map import image_attention, plot_attention_on_image
    from eval.chair import extract_objects

    image = load_image(image_entry[1])
    inputs = processor(images=[image], text=[_detail_request(processor)])
    sequences = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    new_ids = sequences[0, prompt_length:].tolist()
    caption = processor.batch_decode([new_ids])[0]
    objects = extract_objects(caption, vocabulary)
    if not objects.mentions:
        return {"caption": caption, "word": None}
    index, word, _ = objects.mentions[0]
    start = objects.spans[index][0]
    # the first generated token that reaches into the word, and the position whose output predicted it
    first = next(i for i in range(len(new_ids)) if len(processor.batch_decode([new_ids[:i + 1]])[0]) > start)
    grid = image_attention(model, inputs, sequences, prompt_length + first - 1)
    path = out_dir / "attention.png"
    plot_attention_on_image(image, grid, f"attention for '{word}'", path)
    return {"caption": caption, "word": word, "plot": path.name}

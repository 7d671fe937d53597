"""`vlm demo`: the whole suite on the built-in synthetic scenes, on a CPU, in minutes.

1. generate the scenes (train/val/test) with the hallucination-lab co-occurrence bias;
2. train a small VLM from scratch with `train.finetune.train` (the code `accelerate launch` runs);
3. evaluate on the test split: COCO caption metrics, CHAIR, POPE (random/popular/adversarial), VQA accuracy,
   then adversarial POPE and CHAIR again with each mitigation head;
4. write `report.md` and `report.html` with the numbers and plots.

Same seed, same numbers: the training length is a number of steps (or derived from `--minutes`, calibrated on a
2-core machine), never a wall-clock cut-off.
"""

import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from data.scenes import typical_colour_weights
from vlm.cli import positive_int

# Tiny vision towers at 64 px for each of the six backbones: (timm name, create_model kwargs, feature layer).
# Each gives the LLM a 4x4 grid of image tokens (16-px patches, or a stride-16 stage of the hierarchical ones),
# except LookupViT, whose idea is many cheap lookup tokens (8-px patches, 64) beside a few compressed ones.
# 16 tokens are plenty for the scenes' large shapes and keep a training step short: with 64 image tokens
# the same recipe trains at half the speed and grounds its yes/no answers less well.
DEMO_BACKBONES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 16, "depth": 4, "embed_dim": 96, "num_heads": 3}, -1),
    "davit": ("davit_tiny", {"embed_dims": (32, 64, 128, 256), "num_heads": (1, 2, 4, 8), "depths": (1, 1, 1, 1)}, 2),
    "lookupvit": ("lookupvit_tiny_patch16_224",
                  {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3}, -1),
    "biformer": ("biformer_tiny", {"depths": (1, 1, 2, 1), "embed_dims": (32, 64, 128, 256), "topks": (1, 2, 4, -2),
                                   "num_regions": 2}, 2),
    "vim": ("vim_tiny_patch16_224", {"img_size": 64, "patch_size": 16, "depth": 4, "embed_dim": 96}, -1),
    "vig": ("vig_tiny_patch16_224", {"img_size": 64, "patch_size": 16, "depth": 4, "embed_dim": 96, "num_heads": 3}, -1),
}
DEFAULT_BACKBONE = "vit"
DEMO_TEXT_CONFIG = dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=True)
# optimizer steps of the default recipe per minute on 2 quiet CPU cores: 257-263 measured on one machine, 105-110
# on another (a 2-core AMD EPYC, 74 GFLOP/s in fp32 matmuls); --minutes budgets assume the faster one
STEPS_PER_MINUTE = 260
TRAIN_SHARE = 0.85  # of a --minutes budget; the rest generates data and evaluates (about 1.5 minutes)
DEFAULT_STEPS = 2000  # 7.0-7.5 or 18-19 minutes of training on 2 cores (measured, see above): 10-25 in all
COMPARE_ALL_MINUTES = 9.0  # default budget of `--backbone all`, shared by all its runs
# The scenes: the library's co-occurring pairs (moon -> star 90%, heart -> ring 85%, flower -> drop 80% in
# training) with large shapes, one or two independently drawn shapes per image and each shape in its typical colour
# 95% of the time, so that a model trained for minutes on a CPU can tell the shapes apart: such a model learns colour
# long before shape. Each pair shares its colour and the partners are faint (20% opacity): the model sees a partner
# only partly, so it often reports a star beside a moon that has none because the prior says so, the hallucination
# decode-time mitigation is meant for. (With opaque partners of the same colour it cannot tell a moon from a star
# at all, and no decode-time method can help.) Validation and test lower the pair rates to one half, so that many
# images break a rule (at the training rates a handful would), and POPE asks two questions per image, so images
# with two shapes count.
DEMO_SCENES = {"large_prob": 1.0, "max_primary": 2, "colour_weights": typical_colour_weights(0.95),
               "eval_cooccurrence": {"moon": {"star": 0.5}, "heart": {"ring": 0.5}, "flower": {"drop": 0.5}},
               "opacity": {"star": 0.2, "ring": 0.2, "drop": 0.2}, "pope_per_image": 2}
DEMO_IMAGES = 5000
DETAIL_PROMPT = "Describe the image in detail."  # what the scenes' conversations ask
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


def demo_train_config(out_dir: Path, scenes: Path, backbone: str, attention_mode: str, steps: int, seed: int):
    from train.config import CheckpointSpec, DataConfig, DataSource, LoggingSpec, ModelSpec, OptimSpec, \
        ScheduleSpec, StageSpec, TrainConfig

    vision, vision_kwargs, feature_layer = DEMO_BACKBONES[backbone]
    return TrainConfig(
        out_dir=str(out_dir),
        model=ModelSpec(vision=vision, vision_kwargs=dict(vision_kwargs), vision_feature_layer=feature_layer,
                        connector="mlp2x_gelu", text_config=dict(DEMO_TEXT_CONFIG), attention_mode=attention_mode,
                        image_size=64, tokenizer_vocab_size=512,
                        # what the scenes' data asks: questions without a suffix, the detail and caption prompts
                        prompts={"vqa_suffix": "", "pope_suffix": "", "chair": DETAIL_PROMPT, "captions": CAPTION_PROMPT}),
        data=DataConfig(sources=[
            DataSource(kind="scenes", path=str(scenes), split="train", weight=3.0),
            DataSource(kind="coco", path=str(scenes / "captions_train.json"), image_root=str(scenes / "images" / "train"),
                       weight=1.0, options={"prompt": CAPTION_PROMPT, "random_caption": True}),
        ], split_by_length=3),
        stage=StageSpec(name="full", lora=False),
        optim=OptimSpec(lr=2e-3, weight_decay=0.01, max_grad_norm=1.0),
        schedule=ScheduleSpec(name="cosine", warmup_steps=min(30, steps // 10), min_lr_ratio=0.05),
        checkpoint=CheckpointSpec(save_every=max(50, steps // 4), keep_last=1),
        logging=LoggingSpec(log_every=5, progress=True, plot=True),
        batch_size=32, max_steps=steps, precision="fp32", seed=seed,
    )


def most_common_caption_baseline(scenes: Path, references: dict) -> dict:
    """Caption-agnostic baseline: the most common training caption, given for every test image."""
    from .caption_metrics import evaluate_captions

    captions = json.loads((scenes / "captions_train.json").read_text())["annotations"]
    common = Counter(c["caption"] for c in captions).most_common(1)[0][0]
    result = evaluate_captions(references, {image_id: common for image_id in references})
    return {"caption": common, **result["metrics"]}


def evaluate_model(model_dir: Path, scenes: Path, out_dir: Path, mitigations: list[str], batch_size: int = 32,
                   progress: bool = True) -> dict:
    """All of step 3 on the scenes' test split; answers are resumable JSON lines under `out_dir/answers`."""
    from vlm import VisionLanguageModel, VLMProcessor

    from .cooccurrence import CooccurrenceProbes
    from .pope import average_over_splits
    from .sources import scenes_captions, scenes_chair, scenes_pope, scenes_vqa
    from .tasks import run_captions, run_chair, run_pope, run_vqa

    model = VisionLanguageModel.from_pretrained(model_dir).eval()
    processor = VLMProcessor.from_pretrained(model_dir)
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
                                 prompt=DETAIL_PROMPT, generation_kwargs=caption_kwargs, **common)
    probes = CooccurrenceProbes.from_scenes(scenes, "test")

    def add_probes(pope_adversarial: dict, chair: dict) -> None:
        pope_adversarial["cooccurrence_probes"] = probes.pope(pope_splits["adversarial"], pope_adversarial["answers_file"])
        chair["cooccurrence_probes"] = probes.captions(chair["per_caption"])

    add_probes(results["pope"]["splits"]["adversarial"], results["chair"])
    results["captions"] = run_captions(model, processor, caption_images, references, answers / "captions.jsonl",
                                       results_path=out_dir / "captions_results.json", prompt=CAPTION_PROMPT,
                                       generation_kwargs={"do_sample": False, "max_new_tokens": 40}, **common)
    results["captions"]["baseline"] = most_common_caption_baseline(scenes, references)
    results["vqa"] = run_vqa(model, processor, scenes_vqa(scenes, "test"), answers / "vqa.jsonl", prompt_suffix="",
                             generation_kwargs=greedy, **common)
    results["speed"] = {"plain": decode_speed(model, processor, chair_images[:batch_size], None)}
    for method in mitigations:
        kwargs = {"mitigation": [method]}
        try:
            check_mitigation(model, processor, method)
        except ValueError as refused:  # e.g. PAINT needs a ViT-style tower
            results["mitigation"][method] = {"refused": str(refused)}
            continue
        run = {
            "pope_adversarial": run_pope(model, processor, pope_splits["adversarial"], image_root,
                                         answers / f"pope_adversarial_{method}.jsonl",
                                         generation_kwargs={**greedy, **kwargs}, **common),
            "chair": run_chair(model, processor, chair_images, chair_truth, vocabulary, answers / f"chair_{method}.jsonl",
                               prompt=DETAIL_PROMPT, generation_kwargs={**caption_kwargs, **kwargs}, **common),
        }
        add_probes(run["pope_adversarial"], run["chair"])
        results["mitigation"][method] = run
        results["speed"][method] = decode_speed(model, processor, chair_images[:batch_size], kwargs["mitigation"])
    results["attention"] = attention_picture(model, processor, chair_images[0], vocabulary, out_dir)
    return results


def calibrate_heads(model_dir: Path, scenes: Path, num_images: int = 32) -> None:
    """Measure the head statistics the mitigation methods need on validation images, once, beside the weights."""
    from data.images import load_image
    from vlm import VisionLanguageModel, VLMProcessor
    from vlm.mitigation import STATS_FILE, calibrate_mitigation_stats, save_mitigation_stats

    if (model_dir / STATS_FILE).is_file():
        return
    model = VisionLanguageModel.from_pretrained(model_dir).eval()
    processor = VLMProcessor.from_pretrained(model_dir)
    images = [load_image(path) for path in sorted((scenes / "images" / "val").iterdir())[:num_images]]
    stats = calibrate_mitigation_stats(model, processor, images, prompt="<image>\n" + DETAIL_PROMPT)
    save_mitigation_stats(stats, model_dir)


@torch.no_grad()
def check_mitigation(model, processor, method: str) -> None:
    """Raise the method's own error if it cannot run on this model (one tiny generate)."""
    inputs = processor(images=[Image.new("RGB", (8, 8))], text=["<image>\n" + DETAIL_PROMPT])
    model.generate(**inputs, max_new_tokens=1, do_sample=False, mitigation=[method], processor=processor)


@torch.no_grad()
def decode_speed(model, processor, images: list[tuple], mitigation, new_tokens: int = 32) -> float:
    """Seconds per generated token (a batch of `images`, `new_tokens` forced), after a warm-up call."""
    from data.images import load_image

    inputs = processor(images=[load_image(path) for _, path in images],
                       text=["<image>\n" + DETAIL_PROMPT] * len(images))
    kwargs = {"mitigation": mitigation, "processor": processor} if mitigation else {}

    def run():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)

    run()
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / new_tokens


def attention_picture(model, processor, image_entry: tuple, vocabulary, out_dir: Path) -> dict:
    """Caption one test image, find the first object word in the caption and draw where the model looked."""
    from data.images import load_image

    from .attention_map import image_attention, plot_attention_on_image
    from .chair import extract_objects

    image = load_image(image_entry[1])
    inputs = processor(images=[image], text=["<image>\n" + DETAIL_PROMPT])
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


# ------------------------------------------------------------------------------------------------- report
def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _claimed(probes: dict) -> str:
    """'30/32' partners claimed of the co-occurrence probes."""
    return f"{probes['claimed']}/{probes['probes']}"


def _interval(result: dict, metric: str) -> str:
    low, high = result["ci95"][metric]
    return f"[{_pct(low)}, {_pct(high)}]"


def _pope_rows(results: dict) -> list[list[str]]:
    rows = []
    for split, result in results["pope"]["splits"].items():
        rows.append([split, _pct(result["accuracy"]), _interval(result, "accuracy"), _pct(result["precision"]),
                     _pct(result["recall"]), _pct(result["f1"]), _pct(result["yes_ratio"]), str(result["n"])])
    return rows


MITIGATION_COLUMNS = ["mitigation", "adv. POPE acc", "Δ acc [95% CI]", "F1", "yes-ratio", "false positives",
                      "partner claimed", "CHAIR_S", "CHAIR_I", "Δ CHAIR_I [95% CI]", "recall", "partner named", "length",
                      "time/token"]


def _paired(change: dict) -> str:
    """A change in points with its paired 95% interval, marked when the interval holds 0 (within noise)."""
    low, high = (100 * value for value in change["ci95"])
    return f"{100 * change['change']:+.1f} [{low:+.1f}, {high:+.1f}]" + (" (noise)" if change["within_noise"] else "")


def _mitigation_rows(results: dict) -> list[list[str]]:
    from .chair import paired_chair_changes
    from .pope import paired_pope_changes

    plain_speed = results["speed"]["plain"]
    runs = {"none": {"pope_adversarial": results["pope"]["splits"]["adversarial"], "chair": results["chair"]},
            **results["mitigation"]}
    rows = []
    for name, run in runs.items():
        if "refused" in run:
            rows.append([name, "refused: " + run["refused"].split(":")[0]] + [""] * (len(MITIGATION_COLUMNS) - 2))
            continue
        pope, chair = run["pope_adversarial"], run["chair"]
        speed = results["speed"].get("plain" if name == "none" else name)
        plain_pope, plain_chair = runs["none"]["pope_adversarial"], runs["none"]["chair"]
        accuracy_change = chair_i_change = ""
        if name != "none":  # paired over the same questions and images as plain decoding
            accuracy_change = _paired(paired_pope_changes(plain_pope, pope)["accuracy"])
            chair_i_change = _paired(paired_chair_changes(plain_chair, chair)["chair_i"])
        rows.append([name, _pct(pope["accuracy"]), accuracy_change, _pct(pope["f1"]), _pct(pope["yes_ratio"]),
                     str(pope["fp"]), _claimed(pope["cooccurrence_probes"]), _pct(chair["chair_s"]),
                     _pct(chair["chair_i"]), chair_i_change, _pct(chair["recall"]),
                     _claimed(chair["cooccurrence_probes"]), f"{chair['avg_len']:.1f}", f"{speed / plain_speed:.2f}x"])
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report_sections(results: dict, settings: dict) -> list[tuple[str, str, list[str]]]:
    """The report as (title, markdown body, image files) sections; both report.md and report.html use them."""
    captions = results["captions"]["metrics"]
    baseline = results["captions"]["baseline"]
    random_accuracy = results["pope"]["splits"]["random"]["accuracy"]
    summary = (
        f"Trained `{settings['backbone']}` + `mlp2x_gelu` + a {DEMO_TEXT_CONFIG['num_hidden_layers']}-layer Llama-style "
        f"LLM from scratch for {settings['steps']} steps (attention mode `{settings['attention_mode']}`, seed "
        f"{settings['seed']}), in {settings['train_seconds'] / 60:.1f} min; "
        f"{'this re-run reused that model and took' if settings.get('reused_training') else 'everything took'} "
        f"{settings['total_seconds'] / 60:.1f} min.\n\n"
        f"- POPE random accuracy: **{_pct(random_accuracy)}%** (target ≥ 90%: "
        f"{'met' if random_accuracy >= 0.9 else 'missed'}).\n"
        f"- CIDEr: **{captions['CIDEr']:.3f}** against **{baseline['CIDEr']:.3f}** for the caption-agnostic baseline "
        f"(the most common training caption for every image: \"{baseline['caption']}\").\n"
        f"- VQA exact-match accuracy on the test conversations: **{_pct(results['vqa']['accuracy'])}%**."
    )
    pope = _table(["split", "accuracy", "95% CI", "precision", "recall", "F1", "yes-ratio", "n"], _pope_rows(results))
    chair = results["chair"]
    caption_table = _table(
        ["metric", "model", "baseline"],
        [[name, f"{captions[name]:.3f}", f"{baseline[name]:.3f}"] for name in captions if name in baseline],
    )
    chair_text = (f"CHAIR_S {_pct(chair['chair_s'])}% {_interval(chair, 'chair_s')}, CHAIR_I {_pct(chair['chair_i'])}% "
                  f"{_interval(chair, 'chair_i')}, recall {_pct(chair['recall'])}%, average length "
                  f"{chair['avg_len']:.1f} words over {chair['n_captions']} images (prompt \"{DETAIL_PROMPT}\", greedy, "
                  f"64 new tokens; brackets: 95% bootstrap intervals; words processed "
                  f"{'as the reference does' if chair.get('word_processing') == 'nltk' else 'approximately (no NLTK data)'}).")
    mitigation = _table(MITIGATION_COLUMNS, _mitigation_rows(results))
    probes = results["pope"]["splits"]["adversarial"]["cooccurrence_probes"]
    caption_probes = results["chair"]["cooccurrence_probes"]
    bias_text = (f"The co-occurrence bias, measured directly: of the {probes['probes']} adversarial questions about a "
                 f"missing partner (a moon without its star, ...), the model answered yes to {probes['claimed']}; "
                 f"its detailed descriptions name {caption_probes['claimed']} of {caption_probes['probes']} missing "
                 "partners.")
    attention = results["attention"]
    attention_text = (f"Generated caption: \"{attention['caption']}\". Attention of the token that wrote "
                      f"\"{attention['word']}\" to the image tokens, averaged over heads and layers."
                      if attention.get("word") else f"The caption \"{attention['caption']}\" names no object.")
    return [
        ("Summary", summary, []),
        ("Training", f"Loss per step (`{settings['train_dir']}/metrics.jsonl`).", ["loss.png"]),
        ("POPE (test split)", pope + "\n\nPopular and adversarial questions ask about frequent and co-occurring "
         "shapes: the gap to random is what the co-occurrence bias creates. " + bias_text,
         ["pope_metrics.png", "pope_yes_ratio.png"]),
        ("Captions (COCO caption metrics)", caption_table, []),
        ("CHAIR", chair_text, ["chair_vs_length.png"]),
        ("Mitigation heads", mitigation + "\n\nAdversarial POPE and CHAIR with each decode-time method; Δ: the change "
         "from plain decoding in points, with its 95% interval paired over the same questions or images (1,000 "
         "bootstrap resamples), \"(noise)\" when the interval holds 0; partner claimed / named: the co-occurrence "
         "probes above; time per token relative to plain greedy decoding.", []),
        ("Sample captions", "Test images with their generated detailed descriptions; hallucinated objects in red.",
         ["examples.png"]),
        ("Where the model looks", attention_text, [attention["plot"]] if attention.get("plot") else []),
    ]


def write_report(out_dir: Path, results: dict, settings: dict, scenes: Path) -> Path:
    """report.md, report.html, results.json and the plots in `out_dir`."""
    import html
    import shutil

    from .runner import normalise_settings
    from .plots import plot_caption_examples, plot_chair_vs_length, plot_pope_metrics, plot_pope_yes_ratio

    plot_pope_metrics(results["pope"], out_dir / "pope_metrics.png")
    plot_pope_yes_ratio(results["pope"], out_dir / "pope_yes_ratio.png")
    plot_chair_vs_length({"none": results["chair"], **{m: r["chair"] for m, r in results["mitigation"].items()
                                                       if "chair" in r}},
                         out_dir / "chair_vs_length.png")
    examples = [{**entry, "image": scenes / "images" / "test" / f"{int(entry['image_id']):012d}.png"}
                for entry in results["chair"]["per_caption"][:6]]
    plot_caption_examples(examples, out_dir / "examples.png")
    loss_plot = Path(settings["train_dir"]) / "loss.png"
    if loss_plot.is_file():
        shutil.copy(loss_plot, out_dir / "loss.png")

    sections = report_sections(results, settings)
    markdown = ["# VLM demo report", ""]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>VLM demo report</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>",
            "<h1>VLM demo report</h1>"]
    for title, body, images in sections:
        markdown += [f"## {title}", "", body, ""] + [f"![{title}]({image})" for image in images] + [""]
        page.append(f"<h2>{html.escape(title)}</h2>{markdown_to_html(body)}")
        page += [f"<img src='{html.escape(image)}' alt='{html.escape(title)}'>" for image in images]
    page.append("</body></html>")
    (out_dir / "report.md").write_text("\n".join(markdown), encoding="utf-8")
    (out_dir / "report.html").write_text("\n".join(page), encoding="utf-8")
    (out_dir / "results.json").write_text(json.dumps(normalise_settings({"settings": settings, "results": results}), indent=1))
    return out_dir / "report.md"


def markdown_to_html(text: str) -> str:
    """The little markdown the report uses (tables, bullets, bold, code) as HTML."""
    import html
    import re

    def inline(line):
        line = html.escape(line)
        line = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", line)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", line)

    out, table = [], []
    for line in text.split("\n") + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                table.append([inline(cell.strip()) for cell in line.strip("|").split("|")])
            continue
        if table:
            head, *rows = table
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
            table = []
        if line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    return "\n".join(out)



# ---------------------------------------------------------------------------------------------------- run
def train_steps(minutes: float, share: float = TRAIN_SHARE) -> int:
    return max(20, int(minutes * share * STEPS_PER_MINUTE))


def run_demo(out: Path, backbone: str = DEFAULT_BACKBONE, attention_mode: str = "causal", minutes: float | None = None,
             seed: int = 0, num_images: int = DEMO_IMAGES, steps: int | None = None, mitigations: list[str] | None = None,
             progress: bool = True) -> dict:
    """Generate, train, evaluate and report into `out`; returns the results. Re-running resumes: the scenes,
    a finished training run and the answers already written are reused."""
    from data.scenes import SceneConfig, generate_scenes
    from train.finetune import train
    from vlm.mitigation import METHOD_DEFAULTS

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenes = out / "scenes"
    if not (scenes / "scene_config.json").is_file():
        generate_scenes(scenes, num_images, seed=seed, config=SceneConfig(**DEMO_SCENES))
    steps = steps or (train_steps(minutes) if minutes else DEFAULT_STEPS)
    train_dir = out / "train"
    model_dir = train_dir / "final"
    timing = train_dir / "demo_train_seconds.json"  # so that a re-run reports the training time it reuses
    reused = (model_dir / "config.json").is_file()
    if not reused:
        train_started = time.perf_counter()
        config = demo_train_config(train_dir, scenes, backbone, attention_mode, steps, seed)
        config.logging.progress = progress
        config.resume = (train_dir / "checkpoints").is_dir()
        model_dir = train(config)
        timing.write_text(json.dumps({"train_seconds": time.perf_counter() - train_started}))
    train_seconds = json.loads(timing.read_text())["train_seconds"] if timing.is_file() else float("nan")
    mitigations = list(METHOD_DEFAULTS) if mitigations is None else mitigations
    if mitigations:
        calibrate_heads(model_dir, scenes)
    results = evaluate_model(model_dir, scenes, out, mitigations, progress=progress)
    settings = {"backbone": backbone, "attention_mode": attention_mode, "seed": seed, "steps": steps,
                "images": num_images, "train_dir": str(train_dir), "model_dir": str(model_dir),
                "train_seconds": train_seconds, "reused_training": reused,
                "total_seconds": time.perf_counter() - started}
    write_report(out, results, settings, scenes)
    return {"settings": settings, "results": results}


def compare_all(out: Path, minutes: float, seed: int, num_images: int, progress: bool) -> list[dict]:
    """Every backbone (causal) and every attention mode (default backbone) under one budget: one table."""
    from vlm import VisionLanguageModel
    from vlm.masks import ATTENTION_MODES

    minutes = minutes or COMPARE_ALL_MINUTES
    runs = [(name, "causal") for name in DEMO_BACKBONES]
    runs += [(DEFAULT_BACKBONE, mode) for mode in ATTENTION_MODES if mode != "causal"]
    steps = train_steps(minutes / len(runs))
    rows = []
    for backbone, mode in runs:
        result = run_demo(out / f"{backbone}-{mode}", backbone, mode, seed=seed, num_images=num_images, steps=steps,
                          mitigations=[], progress=progress)
        pope, chair = result["results"]["pope"]["splits"], result["results"]["chair"]
        model = VisionLanguageModel.from_pretrained(result["settings"]["model_dir"])
        params = sum(p.numel() for p in model.parameters())
        rows.append([backbone, mode, _pct(pope["random"]["accuracy"]), _pct(pope["adversarial"]["accuracy"]),
                     _pct(chair["chair_i"]), f"{result['settings']['train_seconds']:.0f}", f"{params / 1e6:.2f}M",
                     str(model.num_image_tokens)])
    table = _table(["backbone", "attention mode", "POPE random acc", "POPE adv. acc", "CHAIR_I", "train s", "params",
                    "image tokens"], rows)
    (out / "comparison.md").write_text(f"# Backbones and attention modes, {steps} steps each\n\n{table}\n")
    print(table)
    return rows


# The hallucination measures a method should lower: the two, and the co-occurrence probes behind them.
LOWER_IS_BETTER = {"fp": "false positives", "chair_i": "CHAIR_I", "probes": "partner claimed on POPE",
                   "named": "partner named in captions"}


def mitigation_spread(runs: list[dict]) -> tuple[str, list[str]]:
    """Each mitigation's effect over demo runs that differ only in the seed, against the seed-to-seed spread.

    The spread of a metric is its standard deviation over the seeds without mitigation; a method's effect is the
    mean over seeds of (with method - without). A method lowers a metric reliably when its effect is below
    minus the spread and it lowers the metric on every seed. Returns the markdown table and those methods.
    """
    def metrics(run, name):
        result = run["results"]
        if name == "none":
            pope, chair = result["pope"]["splits"]["adversarial"], result["chair"]
        else:
            pope, chair = result["mitigation"][name]["pope_adversarial"], result["mitigation"][name]["chair"]
        return {"fp": pope["fp"], "probes": probe_pct(pope), "acc": 100 * pope["accuracy"],
                "chair_i": 100 * chair["chair_i"], "named": probe_pct(chair), "chair_s": 100 * chair["chair_s"],
                "recall": 100 * chair["recall"]}

    def probe_pct(result):  # nan when a test split has no image breaking a pair rule
        rate = result["cooccurrence_probes"]["rate"]
        return math.nan if rate is None else 100 * rate

    def mean_std(values):
        if any(math.isnan(value) for value in values):  # statistics.stdev refuses nan
            return math.nan, math.nan
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    columns = {"fp": "adv. POPE false positives", "probes": "partner claimed (POPE) %", "acc": "adv. POPE acc",
               "chair_i": "CHAIR_I", "named": "partner named (captions) %", "chair_s": "CHAIR_S", "recall": "recall"}
    plain = [metrics(run, "none") for run in runs]
    spread = {key: mean_std([m[key] for m in plain])[1] for key in plain[0]}
    methods = [name for name, run in runs[0]["results"]["mitigation"].items() if "refused" not in run]
    rows, helping = [], []
    for name in ["none", *methods]:
        per_seed = [metrics(run, name) for run in runs]
        row = [name]
        for key in columns:
            mean, std = mean_std([m[key] for m in per_seed])
            delta = [m[key] - p[key] for m, p in zip(per_seed, plain)]
            cell = f"{mean:.1f} ± {std:.1f}"
            if name != "none":
                effect = sum(delta) / len(delta)
                cell += f" ({effect:+.1f})"
                if key in LOWER_IS_BETTER and effect < -spread[key] and max(delta) < 0:
                    helping.append(f"{name} ({LOWER_IS_BETTER[key]})")
            row.append(cell)
        rows.append(row)
    table = _table(["mitigation", *columns.values()], rows)
    note = (f"Mean ± standard deviation over {len(runs)} seeds (seeds {', '.join(str(r['settings']['seed']) for r in runs)});"
            " in brackets the mean change against no mitigation. Seed-to-seed spread without mitigation: false "
            f"positives ± {spread['fp']:.1f}, CHAIR_I ± {spread['chair_i']:.1f} points. Partner claimed / named: the "
            "share of co-occurrence probes (a trigger such as a moon without its partner, the star) on which POPE's "
            "answer or the caption claims the partner.")
    return f"{table}\n\n{note}", helping


def compare_seeds(out: Path, seeds: list[int], backbone: str, attention_mode: str, minutes: float, num_images: int,
                  steps: int | None, progress: bool) -> list[str]:
    """The default demo once per seed, then `seeds.md`: each mitigation's effect against the seed spread."""
    runs = [run_demo(out / f"seed-{seed}", backbone, attention_mode, minutes, seed, num_images, steps,
                     progress=progress) for seed in seeds]
    table, helping = mitigation_spread(runs)
    verdict = ("Lowered by more than the spread on every seed: " + ", ".join(helping) + ".") if helping else \
        "No method lowers a hallucination measure by more than the seed-to-seed spread on every seed."
    (out / "seeds.md").write_text(f"# Mitigation over seeds ({backbone}, {attention_mode})\n\n{table}\n\n{verdict}\n")
    print(table + "\n\n" + verdict)
    return helping


def main(args) -> int:
    from train.finetune import TrainingInterrupted

    try:
        return _run(args)
    except TrainingInterrupted:  # the demo resumes by itself: the training's own resume command is not needed
        print(f"vlm demo continues where it stopped when the same command runs again (--out {args.out})",
              file=sys.stderr)
        raise


def _run(args) -> int:
    if args.backbone == "all":
        compare_all(Path(args.out), args.minutes, args.seed, args.images, not args.no_progress)
        return 0
    if args.seeds:
        compare_seeds(Path(args.out), args.seeds, args.backbone, args.attention_mode, args.minutes, args.images,
                      args.steps, not args.no_progress)
        return 0
    result = run_demo(Path(args.out), args.backbone, args.attention_mode, args.minutes, args.seed, args.images,
                      args.steps, progress=not args.no_progress)
    report = Path(args.out) / "report.md"
    pope = result["results"]["pope"]["splits"]
    print("POPE accuracy random/popular/adversarial: " + " / ".join(_pct(pope[s]["accuracy"]) for s in pope))
    print(f"report: {report} (and report.html)")
    return 0


def register(subparsers) -> None:
    from vlm.masks import ATTENTION_MODES

    parser = subparsers.add_parser("demo", help="train and evaluate a small VLM on the built-in scenes, with a report")
    parser.add_argument("--out", default="runs/demo", help="output folder (re-running resumes)")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=[*DEMO_BACKBONES, "all"],
                        help="vision backbone, or 'all' for the comparison table")
    parser.add_argument("--attention-mode", default="causal", choices=ATTENTION_MODES,
                        help="attention mask of the LLM (see `vlm list modes`)")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"budget on a 2-core CPU at {STEPS_PER_MINUTE} steps/min, sets the training steps (default: "
                             f"{DEFAULT_STEPS} steps, 10-25 minutes in all by the CPU; --backbone all: "
                             f"{COMPARE_ALL_MINUTES:g} minutes for all runs)")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps (overrides --minutes)")
    parser.add_argument("--images", type=positive_int, default=DEMO_IMAGES, help="synthetic scenes to generate")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the scenes and the training")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run the demo once per seed (into OUT/seed-N) and write OUT/seeds.md: each mitigation's "
                             "effect against the seed-to-seed spread")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=main)

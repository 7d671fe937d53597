"""The demo's report: `report.md` and `report.html` (through `eval.report.write_document`), `results.json` and the
plots: the numbers with their 95% intervals, each mitigation's paired change from plain decoding, sample captions
and where the model looks."""

import json
from pathlib import Path

from data.scene_folder import ScenesFolder
from eval.report import format_change, markdown_table, write_document


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _claimed(probes: dict) -> str:
    """'30/32' partners claimed of the co-occurrence probes."""
    return f"{probes['claimed']}/{probes['probes']}"


def _interval(result: dict, metric: str) -> str:
    low, high = result["ci95"][metric]
    return f"[{pct(low)}, {pct(high)}]"


def _pope_rows(results: dict) -> list[list[str]]:
    rows = []
    for split, result in results["pope"]["splits"].items():
        rows.append([split, pct(result["accuracy"]), _interval(result, "accuracy"), pct(result["precision"]),
                     pct(result["recall"]), pct(result["f1"]), pct(result["yes_ratio"]), str(result["n"])])
    return rows


MITIGATION_COLUMNS = ["mitigation", "adv. POPE acc", "Δ acc [95% CI]", "F1", "yes-ratio", "false positives",
                      "partner claimed", "CHAIR_S", "CHAIR_I", "Δ CHAIR_I [95% CI]", "recall", "partner named", "length",
                      "time/token"]


def _mitigation_rows(results: dict) -> list[list[str]]:
    from eval.chair import paired_chair_changes
    from eval.pope import paired_pope_changes

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
            accuracy_change = format_change(paired_pope_changes(plain_pope, pope)["accuracy"], points=True)
            chair_i_change = format_change(paired_chair_changes(plain_chair, chair)["chair_i"], points=True)
        rows.append([name, pct(pope["accuracy"]), accuracy_change, pct(pope["f1"]), pct(pope["yes_ratio"]),
                     str(pope["fp"]), _claimed(pope["cooccurrence_probes"]), pct(chair["chair_s"]),
                     pct(chair["chair_i"]), chair_i_change, pct(chair["recall"]),
                     _claimed(chair["cooccurrence_probes"]), f"{chair['avg_len']:.1f}", f"{speed / plain_speed:.2f}x"])
    return rows


def _exit_section(results: dict) -> list[tuple[str, str, list[str]]]:
    """The visual-token exit at every layer (when the demo ran the exit)."""
    rows = results.get("visual_exit")
    if not rows:
        return []
    plain = rows["none"]
    table = markdown_table(
        ["exit layer", "adv. POPE acc", "Δ acc", "prefill ms", "decode ms/token", "time", "FLOPs"],
        [["none" if method == "none" else method.split("=")[1], pct(row["accuracy"]),
          "" if method == "none" else f"{100 * (row['accuracy'] - plain['accuracy']):+.1f}",
          f"{row['pope_prefill_ms']:.1f}", f"{row['pope_decode_ms']:.2f}", f"{row['pope_time']:.2f}x",
          f"{row['pope_flops']:.2f}x"] for method, row in rows.items()])
    return [("Visual-token exit", table + "\n\nThe image tokens leave the decoder at each layer (auto: where DyVTE's "
             "routers, trained at calibration, decide per question): adversarial POPE, and the time and FLOPs of "
             "a POPE-style call (a batch of 16, 8 new tokens; fastest of 3) against plain decoding.", [])]


def _grid_section(results: dict) -> list[tuple[str, str, list[str]]]:
    """LookupViT's compressed grid: accuracy and tower time per grid (only for a LookupViT tower)."""
    tradeoff = results.get("compressed_grid")
    if not tradeoff:
        return []
    grids = tradeoff["grids"]
    own = next(row for grid, row in grids.items() if int(grid) == tradeoff["default"][0])
    rows = [[f"{grid}x{grid}{' (default)' if int(grid) == tradeoff['default'][0] else ''}", pct(row["accuracy"]),
             f"{100 * (row['accuracy'] - own['accuracy']):+.1f}", pct(row["f1"]), f"{1000 * row['tower_seconds']:.1f}",
             f"{row['tower_seconds'] / own['tower_seconds']:.2f}x"] for grid, row in grids.items()]
    table = markdown_table(["compressed grid", "adv. POPE acc", "Δ acc", "F1", "tower ms", "tower time"], rows)
    images = next(iter(grids.values()))["images"]
    return [("LookupViT's compressed grid", table + "\n\nThe same model with each compressed grid at inference "
             f"(it trained on all of them, one drawn per batch): adversarial POPE, and the tower's time for a batch of "
             f"{images} images (fastest of 5).", [])]


def report_sections(results: dict, settings: dict) -> list[tuple[str, str, list[str]]]:
    """The report as (title, markdown body, image files) sections; both report.md and report.html use them."""
    captions = results["captions"]["metrics"]
    baseline = results["captions"]["baseline"]
    random_accuracy = results["pope"]["splits"]["random"]["accuracy"]
    summary = (
        f"Trained `{settings['backbone']}` + `mlp2x_gelu` + a {settings['llm_layers']}-layer Llama-style "
        f"LLM from scratch for {settings['steps']} steps (attention mode `{settings['attention_mode']}`, seed "
        f"{settings['seed']}), in {settings['train_seconds'] / 60:.1f} min; "
        f"{'this re-run reused that model and took' if settings.get('reused_training') else 'everything took'} "
        f"{settings['total_seconds'] / 60:.1f} min.\n\n"
        f"- POPE random accuracy: **{pct(random_accuracy)}%** (target ≥ 90%: "
        f"{'met' if random_accuracy >= 0.9 else 'missed'}).\n"
        f"- CIDEr: **{captions['CIDEr']:.3f}** against **{baseline['CIDEr']:.3f}** for the caption-agnostic baseline "
        f"(the most common training caption for every image: \"{baseline['caption']}\").\n"
        f"- VQA exact-match accuracy on the test conversations: **{pct(results['vqa']['accuracy'])}%**."
    )
    pope = markdown_table(["split", "accuracy", "95% CI", "precision", "recall", "F1", "yes-ratio", "n"], _pope_rows(results))
    chair = results["chair"]
    caption_table = markdown_table(
        ["metric", "model", "baseline"],
        [[name, f"{captions[name]:.3f}", f"{baseline[name]:.3f}"] for name in captions if name in baseline],
    )
    words = "as the reference does" if chair.get("word_processing") == "nltk" else "approximately (no NLTK data)"
    chair_text = (f"CHAIR_S {pct(chair['chair_s'])}% {_interval(chair, 'chair_s')}, CHAIR_I {pct(chair['chair_i'])}% "
                  f"{_interval(chair, 'chair_i')}, recall {pct(chair['recall'])}%, average length "
                  f"{chair['avg_len']:.1f} words over {chair['n_captions']} images (prompt "
                  f"\"{settings['chair_prompt']}\", greedy, 64 new tokens; brackets: 95% bootstrap intervals; words "
                  f"processed {words}).")
    mitigation = markdown_table(MITIGATION_COLUMNS, _mitigation_rows(results))
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
        *_exit_section(results),
        *_grid_section(results),
        ("Sample captions", "Test images with their generated detailed descriptions; hallucinated objects in red.",
         ["examples.png"]),
        ("Where the model looks", attention_text, [attention["plot"]] if attention.get("plot") else []),
    ]


def write_report(out_dir: Path, results: dict, settings: dict, scenes: Path) -> Path:
    """report.md, report.html, results.json and the plots in `out_dir`."""
    import shutil

    from eval.plots import plot_caption_examples, plot_chair_vs_length, plot_pope_metrics, plot_pope_yes_ratio
    from eval.runner import normalise_settings

    plot_pope_metrics(results["pope"], out_dir / "pope_metrics.png")
    plot_pope_yes_ratio(results["pope"], out_dir / "pope_yes_ratio.png")
    plot_chair_vs_length({"none": results["chair"], **{m: r["chair"] for m, r in results["mitigation"].items()
                                                       if "chair" in r}},
                         out_dir / "chair_vs_length.png")
    folder = ScenesFolder(scenes)
    examples = [{**entry, "image": folder.image("test", entry["image_id"])}
                for entry in results["chair"]["per_caption"][:6]]
    plot_caption_examples(examples, out_dir / "examples.png")
    loss_plot = Path(settings["train_dir"]) / "loss.png"
    if loss_plot.is_file():
        shutil.copy(loss_plot, out_dir / "loss.png")
    (out_dir / "results.json").write_text(json.dumps(normalise_settings({"settings": settings, "results": results}),
                                                     indent=1))
    return write_document(out_dir, "report", "VLM demo report", report_sections(results, settings))

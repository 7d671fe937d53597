"""Report figures for the evaluations (matplotlib, Agg backend: no display needed).

Each function writes one image file (format from the suffix: .png, .pdf, .svg) and returns the values it drew,
read back from the figure, so callers and tests can check what a plot shows.

- :func:`plot_pope_metrics`: accuracy, precision, recall and F1 per POPE split (and the average), grouped bars;
- :func:`plot_pope_yes_ratio`: predicted yes-ratio per split against the balanced 0.5 line;
- :func:`plot_chair_vs_length`: CHAIR_S / CHAIR_I against mean caption length, one point per run (e.g. 64 vs
  512 new tokens, or decoding methods), and CHAIR_S per caption-length bin;
- :func:`plot_caption_examples`: images with their captions, hallucinated object words in red.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.offsetbox import AnnotationBbox, HPacker, TextArea, VPacker  # noqa: E402
from PIL import Image  # noqa: E402

POPE_BAR_METRICS = ("accuracy", "precision", "recall", "f1")
HALLUCINATION_COLOR = "tab:red"


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _pope_rows(results: Mapping) -> dict[str, Mapping]:
    """Split name -> metrics from :func:`eval.pope.evaluate_pope_splits` output, with the average last."""
    rows = dict(results["splits"])
    if "average" in results and len(rows) > 1:
        rows["average"] = results["average"]
    return rows


def plot_pope_metrics(results: Mapping, path: str | Path) -> dict[str, dict[str, float]]:
    """Grouped bars of accuracy/precision/recall/F1 (in %) per split; returns ``{split: {metric: height}}``."""
    rows = _pope_rows(results)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 3.6))
    width = 0.8 / len(POPE_BAR_METRICS)
    drawn: dict[str, dict[str, float]] = {split: {} for split in rows}
    for k, metric in enumerate(POPE_BAR_METRICS):
        heights = [100 * rows[split][metric] for split in rows]
        bars = ax.bar([i + (k - 1.5) * width for i in range(len(rows))], heights, width, label=metric)
        for split, bar in zip(rows, bars):
            drawn[split][metric] = float(bar.get_height())
    ax.set_xticks(range(len(rows)), list(rows))
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    title = "POPE"
    if "convention" in results:
        title += f" (answer parsing: {results['convention']})"
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    _save(fig, path)
    return drawn


def plot_pope_yes_ratio(results: Mapping, path: str | Path) -> dict[str, float]:
    """Bars of the predicted yes-ratio (in %) per split with the 50 % line; returns ``{split: height}``."""
    rows = _pope_rows(results)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(rows), 3.2))
    bars = ax.bar(list(rows), [100 * rows[split]["yes_ratio"] for split in rows], color="tab:gray")
    ax.axhline(50, color="black", linestyle="--", linewidth=1, label="balanced (50 %)")
    ax.set_ylim(0, 100)
    ax.set_ylabel("answered yes (%)")
    ax.set_title("POPE yes-ratio")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    drawn = {split: float(bar.get_height()) for split, bar in zip(rows, bars)}
    _save(fig, path)
    return drawn


def plot_chair_vs_length(runs: Mapping[str, Mapping], path: str | Path, bins: int = 5) -> dict:
    """CHAIR against caption length for several runs (``{label: evaluate_chair result}``).

    Left: one point per run at (mean length, CHAIR_S) and (mean length, CHAIR_I), in %. Right: for each run,
    CHAIR_S within equal-width bins of caption length (bins shared by all runs; empty bins are skipped).
    Returns ``{"runs": {label: {"avg_len", "chair_s", "chair_i"}}, "bins": {label: [(bin centre, CHAIR_S %)]}}``.
    """
    if not runs:
        raise ValueError("no CHAIR runs to plot")
    fig, (ax_runs, ax_bins) = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn: dict = {"runs": {}, "bins": {}}
    for label, result in runs.items():
        s_points = ax_runs.scatter([result["avg_len"]], [100 * result["chair_s"]], marker="o")
        color = s_points.get_facecolor()[0]
        i_points = ax_runs.scatter([result["avg_len"]], [100 * result["chair_i"]], marker="^", color=color)
        ax_runs.annotate(label, (result["avg_len"], 100 * result["chair_s"]), textcoords="offset points",
                         xytext=(4, 4), fontsize="small")
        (x, s), (_, i) = s_points.get_offsets()[0], i_points.get_offsets()[0]
        drawn["runs"][label] = {"avg_len": float(x), "chair_s": float(s), "chair_i": float(i)}
    ax_runs.set_xlabel("mean caption length (tokens)")
    ax_runs.set_ylabel("%")
    ax_runs.set_title("CHAIR_S (o) and CHAIR_I (^) per run")

    all_lengths = [len(c["words"]) for result in runs.values() for c in result["per_caption"]]
    low = min(all_lengths)
    step = (max(all_lengths) - low) / bins or 1.0  # equal-width bins shared by all runs; the last one is closed
    for label, result in runs.items():
        flags_by_bin: dict[int, list[bool]] = {}
        for caption in result["per_caption"]:
            index = min(int((len(caption["words"]) - low) / step), bins - 1)
            flags_by_bin.setdefault(index, []).append(bool(caption["hallucinated"]))
        filled = sorted(flags_by_bin)
        centres = [low + step * (index + 0.5) for index in filled]
        values = [100 * sum(flags_by_bin[index]) / len(flags_by_bin[index]) for index in filled]
        (line,) = ax_bins.plot(centres, values, marker="o", label=label)
        drawn["bins"][label] = [(float(x), float(y)) for x, y in line.get_xydata()]
    ax_bins.set_xlabel("caption length (tokens)")
    ax_bins.set_ylabel("CHAIR_S (%)")
    ax_bins.set_ylim(-2, 102)
    ax_bins.set_title("CHAIR_S by caption length")
    ax_bins.legend(fontsize="small")
    _save(fig, path)
    return drawn


def _caption_box(caption: str, red_spans: Sequence[Sequence[int]], width: int) -> tuple[VPacker, list[str]]:
    """The caption wrapped at ``width`` characters, characters inside ``red_spans`` in red.

    Returns the drawing box and the red text pieces drawn."""
    is_red = [False] * len(caption)
    for start, end in red_spans:
        is_red[start:end] = [True] * (end - start)
    lines: list[list[HPacker]] = [[]]
    used = 0
    red_pieces = []
    for chunk in re.finditer(r"\S+", caption):  # whitespace-separated words, e.g. "dogs," (red "dogs", black ",")
        if lines[-1] and used + len(chunk.group()) > width:
            lines.append([])
            used = 0
        used += len(chunk.group()) + 1
        pieces = []
        for red, group in itertools.groupby(range(chunk.start(), chunk.end()), key=lambda k: is_red[k]):
            positions = list(group)
            text = caption[positions[0] : positions[-1] + 1]
            color = HALLUCINATION_COLOR if red else "black"
            pieces.append(TextArea(text, textprops={"color": color, "fontsize": 8}))
            if red:
                red_pieces.append(text)
        lines[-1].append(HPacker(children=pieces, pad=0, sep=0))
    rows = [HPacker(children=line, pad=0, sep=4) for line in lines]
    return VPacker(children=rows, pad=0, sep=2, align="left"), red_pieces


def plot_caption_examples(
    examples: Sequence[Mapping], path: str | Path, columns: int = 3, max_chars: int = 600, wrap: int = 48
) -> list[list[str]]:
    """A grid of images with their captions, hallucinated words in red.

    Each example has ``image`` (a PIL image or a path), ``caption`` and optionally ``hallucinated_spans``
    (character ranges to mark, as in :func:`eval.chair.evaluate_chair`'s ``per_caption`` entries, so
    ``{**entry, "image": image}`` works) and ``title``. Captions longer than ``max_chars`` are cut with "...".
    Returns, per example, the red text pieces drawn.
    """
    if not examples:
        raise ValueError("no examples to plot")
    columns = min(columns, len(examples))
    rows = -(-len(examples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 6.0 * rows), squeeze=False)
    drawn = []
    for ax, example in zip(axes.flat, examples):
        image = example["image"]
        if not isinstance(image, Image.Image):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        ax.imshow(image)
        ax.set_axis_off()
        if "title" in example:
            ax.set_title(str(example["title"]), fontsize=9)
        caption = example["caption"]
        spans = [(start, end) for start, end in example.get("hallucinated_spans", ()) if start < max_chars]
        if len(caption) > max_chars:
            caption = caption[:max_chars] + "..."
        box, red_pieces = _caption_box(caption, spans, wrap)
        ax.add_artist(AnnotationBbox(box, (0.0, -0.03), xycoords="axes fraction", box_alignment=(0.0, 1.0),
                                     frameon=False))
        drawn.append(red_pieces)
    for ax in list(axes.flat)[len(examples):]:
        ax.set_axis_off()
    _save(fig, path)
    return drawn

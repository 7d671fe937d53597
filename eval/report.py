"""Evaluation reports: a JSON summary, the full details, and PNG plots drawn by `eval.plots`.

Files written into the output folder for a run named NAME (`pope`, `chair_64tok`, `captions`, `vqa`):
`NAME_summary.json` (headline numbers, settings, errors), `NAME_details.json` (per caption / image / question
results), `NAME_report.md` and `NAME_report.html` (the headline as tables, with the plots) and the plots:
`pope_metrics.png`, `pope_yes_ratio.png`; `chair_vs_length.png` (every CHAIR run found in the folder, e.g. the
64- and 512-token regimes side by side) and `NAME_examples.png` (images with their captions, hallucinated objects
in red). `write_document` is the one markdown + HTML writer; the demo's report uses it too.
"""

import html
import json
import re
from pathlib import Path

from . import plots
from .chair import paired_chair_changes
from .pope import paired_pope_changes
from .runner import normalise_settings

DETAIL_FIELDS = ("per_caption", "per_image", "per_question")
CHAIR_HEADLINE = ("chair_s", "chair_i", "recall", "avg_len", "n_captions", "ci95")
POPE_HEADLINE = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")
NUM_EXAMPLES = 6
# The metrics whose change from a baseline run the headline shows (the summary holds every metric's).
CHANGE_HEADLINE = {"pope": ("accuracy", "f1", "yes_ratio"), "chair": ("chair_s", "chair_i", "recall")}


def _without_details(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in DETAIL_FIELDS}


def changes_from_baseline(task: str, baseline: dict, result: dict) -> dict:
    """Each metric's change from `baseline` (an earlier run's details) to `result`, with its 95% interval paired over
    the questions (POPE, per split both runs hold) or images (CHAIR) both scored, and `within_noise`."""
    result = normalise_settings(result)  # question ids as the baseline's JSON spells them
    if task == "pope":
        shared = [name for name in result["splits"] if name in baseline.get("splits", {})]
        if not shared:
            raise ValueError(f"--baseline: no POPE split in common (baseline {sorted(baseline.get('splits', {}))}, "
                             f"this run {sorted(result['splits'])})")
        changes = {name: paired_pope_changes(baseline["splits"][name], result["splits"][name]) for name in shared}
        paired = sum(split["n_paired"] for split in changes.values())
    else:
        changes = paired_chair_changes(baseline, result)
        paired = changes["n_paired"]
    if not paired:
        raise ValueError(f"--baseline: the baseline and this run scored no {'question' if task == 'pope' else 'image'} "
                         "in common")
    return changes


def _rounded_change(change: dict) -> dict:
    return {"change": round(change["change"], 4), "ci95": [round(value, 4) for value in change["ci95"]],
            "within_noise": change["within_noise"]}


def _changes_headline(task: str, changes: dict) -> dict:
    if task == "pope":
        return {name: {**{key: _rounded_change(split[key]) for key in CHANGE_HEADLINE[task]}, "n": split["n_paired"]}
                for name, split in changes.items()}
    return {**{key: _rounded_change(changes[key]) for key in CHANGE_HEADLINE[task]}, "n": changes["n_paired"]}


def headline(task: str, result: dict) -> dict:
    """The few numbers to print and compare for a task (with their change from a baseline run, if one was given)."""
    table = _metrics_headline(task, result)
    if "versus_baseline" in result:
        table["versus_baseline"] = _changes_headline(task, result["versus_baseline"]["changes"])
    return table


def _metrics_headline(task: str, result: dict) -> dict:
    if task == "pope":
        rows = {**result["splits"], "average": result["average"]}
        table = {name: {key: round(row[key], 4) for key in POPE_HEADLINE if key in row} for name, row in rows.items()}
        for name, row in rows.items():  # the splits' 95% bootstrap intervals (the average row has none)
            if "ci95" in row:
                table[name]["ci95"] = {key: [round(v, 4) for v in row["ci95"][key]] for key in POPE_HEADLINE
                                       if key in row["ci95"]}
        if "by_convention" in result:  # rescored answers: the accuracy under every parsing rule, side by side
            table["accuracy_by_convention"] = {convention: {split: round(accuracy, 4) for split, accuracy in row.items()}
                                               for convention, row in result["by_convention"].items()}
        return table
    if task == "chair":
        return {key: result[key] for key in CHAIR_HEADLINE}
    if task == "captions":
        return {**result["metrics"], "n": result["n_images"]}
    return {"accuracy": result["accuracy"], "n": result["n"]}


def count_scored(task: str, result: dict) -> int:
    """How many inputs the metrics are computed on (the answered ones)."""
    if task == "pope":
        return sum(split["n"] for split in result["splits"].values())
    return result["n_captions"] if task == "chair" else result["n_images"] if task == "captions" else result["n"]


def count_errors(task: str, result: dict) -> int:
    if task == "pope":
        return sum(split["n_errors"] for split in result["splits"].values())
    return result["n_errors"]


def _example_captions(result: dict, images: dict) -> list[dict]:
    """Up to NUM_EXAMPLES captions with their images, those with hallucinations first."""
    entries = result.get("per_caption")
    if entries is None:  # COCO caption metrics: plain captions
        captions = json.loads(Path(result["results_file"]).read_text()) if result.get("results_file") else []
        entries = captions
    entries = [entry for entry in entries if entry["image_id"] in images]
    entries = sorted(entries, key=lambda entry: not entry.get("hallucinated"))[:NUM_EXAMPLES]
    return [{"image": images[entry["image_id"]], "caption": entry["caption"], "title": f"image {entry['image_id']}",
             "hallucinated_spans": entry.get("hallucinated_spans", [])} for entry in entries]


def _chair_runs(out_dir: Path) -> dict:
    """Every CHAIR run in the folder, by label ("64 tokens", "512 tokens")."""
    runs = {}
    for path in sorted(out_dir.glob("chair_*tok_details.json"), key=lambda p: int(p.name.split("_")[1][:-3])):
        runs[path.name.split("_")[1].replace("tok", " tokens")] = json.loads(path.read_text())
    return runs


def draw_plots(task: str, name: str, result: dict, out_dir: Path, images: dict) -> list[str]:
    """The task's plots (PNG) in `out_dir`; returns their file names."""
    drawn = []
    if task == "pope":
        plots.plot_pope_metrics(result, out_dir / "pope_metrics.png")
        plots.plot_pope_yes_ratio(result, out_dir / "pope_yes_ratio.png")
        drawn += ["pope_metrics.png", "pope_yes_ratio.png"]
    if task == "chair":
        plots.plot_chair_vs_length(_chair_runs(out_dir), out_dir / "chair_vs_length.png")
        drawn.append("chair_vs_length.png")
    if task in ("chair", "captions"):
        examples = _example_captions(result, images)
        if examples:
            plots.plot_caption_examples(examples, out_dir / f"{name}_examples.png")
            drawn.append(f"{name}_examples.png")
    return drawn


def write_report(out_dir, task: str, result: dict, model_name: str, generation_kwargs: dict,
                 images: dict | None = None, name: str | None = None) -> dict:
    """Write `NAME_details.json`, the plots and `NAME_summary.json`; returns the summary.

    `result` is what the `eval.tasks` runner returned (for POPE: `{"convention", "splits", "average", ...}`
    with one `run_pope` result per split); `images` maps image ids to image paths for the example plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or task
    details_file = out_dir / f"{name}_details.json"
    details_file.write_text(json.dumps(normalise_settings(result), indent=1, ensure_ascii=False), encoding="utf-8")
    summary = {
        "task": task,
        "model": model_name,
        "generation": normalise_settings(generation_kwargs),
        "headline": headline(task, result),
        "n_errors": count_errors(task, result),
        "n_scored": count_scored(task, result),
        "result": normalise_settings(_without_details(result)),
        "details_file": str(details_file),
        "plots": draw_plots(task, name, result, out_dir, images or {}),
    }
    summary["summary_file"] = str(out_dir / f"{name}_summary.json")
    Path(summary["summary_file"]).write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    counts = f"{summary['n_scored']} inputs scored, {summary['n_errors']} failed; model `{model_name}`."
    if summary["n_errors"]:
        counts += (f" **{summary['n_errors']} inputs failed: these metrics describe only the answered ones** (the "
                   f"errors are in {Path(summary['summary_file']).name}).")
    write_document(out_dir, f"{name}_report", f"vlm eval {task}",
                   [("Results", counts + "\n\n" + headline_markdown(task, summary["headline"]), summary["plots"])])
    return summary


# --------------------------------------------------------------------------------------- markdown and HTML
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_to_html(text: str) -> str:
    """The little markdown the reports use (tables, bullets, bold, code) as HTML."""
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


def write_document(out_dir, stem: str, title: str, sections: list[tuple[str, str, list[str]]]) -> Path:
    """`STEM.md` and `STEM.html` from (section title, markdown body, image files) sections; returns the .md path."""
    out_dir = Path(out_dir)
    markdown = [f"# {title}", ""]
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>"]
    for heading, body, images in sections:
        markdown += [f"## {heading}", "", body, ""] + [f"![{heading}]({image})" for image in images] + [""]
        page.append(f"<h2>{html.escape(heading)}</h2>{markdown_to_html(body)}")
        page += [f"<img src='{html.escape(image)}' alt='{html.escape(heading)}'>" for image in images]
    page.append("</body></html>")
    (out_dir / f"{stem}.md").write_text("\n".join(markdown), encoding="utf-8")
    (out_dir / f"{stem}.html").write_text("\n".join(page), encoding="utf-8")
    return out_dir / f"{stem}.md"


def _with_interval(row: dict, key: str) -> str:
    interval = row.get("ci95", {}).get(key)
    return f"{row[key]:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def format_change(change: dict, points: bool = False) -> str:
    """A change from a baseline with its paired 95% interval, "(noise)" when the interval holds 0; `points`:
    as percentage points with one decimal, else as the raw difference with four."""
    scale, digits = (100, 1) if points else (1, 4)
    low, high = (scale * value for value in change["ci95"])
    return (f"{scale * change['change']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
            + (" (noise)" if change["within_noise"] else ""))


def headline_markdown(task: str, table: dict) -> str:
    """A task's headline (see `headline`) as markdown tables: values with their 95% intervals, and the changes
    from a baseline run with their paired intervals."""
    changes = table.get("versus_baseline")
    if task == "pope":
        splits = [name for name in table if name not in ("accuracy_by_convention", "versus_baseline")]
        columns = [key for key in POPE_HEADLINE if key != "n"]
        parts = [markdown_table(["split", *columns, "n"], [[name, *(_with_interval(table[name], key) for key in columns),
                                                             str(table[name].get("n", ""))] for name in splits])]
        by_convention = table.get("accuracy_by_convention")
        if by_convention:
            names = list(next(iter(by_convention.values())))
            parts.append("Accuracy by answer-parsing convention:\n\n" + markdown_table(
                ["convention", *names], [[rule, *(f"{row[name]:.4f}" for name in names)]
                                         for rule, row in by_convention.items()]))
        if changes:
            keys = CHANGE_HEADLINE[task]
            parts.append("Change from the baseline run (95% interval paired over the same questions):\n\n"
                         + markdown_table(["split", *keys, "n"], [[name, *(format_change(row[key]) for key in keys),
                                                                   str(row["n"])] for name, row in changes.items()]))
        return "\n\n".join(parts)
    if task == "chair":
        keys = [key for key in CHAIR_HEADLINE if key not in ("n_captions", "ci95")]
        parts = [markdown_table(["metric", "value [95% CI]"], [[key, _with_interval(table, key)] for key in keys]
                                + [["n", str(table["n_captions"])]])]
        if changes:
            parts.append("Change from the baseline run (95% interval paired over the same images):\n\n"
                         + markdown_table(["metric", "change [95% CI]"],
                                          [[key, format_change(changes[key])] for key in CHANGE_HEADLINE[task]]
                                          + [["n", str(changes["n"])]]))
        return "\n\n".join(parts)
    return markdown_table(["metric", "value"], [[key, f"{value:.4f}" if isinstance(value, float) else str(value)]
                                               for key, value in table.items()])

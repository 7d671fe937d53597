"""Seed statistics: the demo once per seed, and each mitigation head's effect against the seed-to-seed spread."""

import math
import statistics
from pathlib import Path

from eval.report import markdown_table

from .run import run_demo


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
    table = markdown_table(["mitigation", *columns.values()], rows)
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

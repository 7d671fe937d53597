"""`vlm demo`'s runs: one demo (generate, train, evaluate, report; a re-run resumes), and every backbone and attention
mode under one budget (`--backbone all`)."""

import json
import time
from pathlib import Path

from data.scene_folder import ScenesFolder
from eval.report import markdown_table

from .evaluate import calibrate_heads, evaluate_model
from .recipe import (COMPARE_ALL_MINUTES, DEFAULT_BACKBONE, DEFAULT_STEPS, DEMO_BACKBONES, DEMO_IMAGES, DEMO_SCENES,
                     demo_train_config, train_steps)
from .report import pct, write_report


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
    if not ScenesFolder(scenes).is_generated():
        generate_scenes(scenes, num_images, seed=seed, config=SceneConfig(**DEMO_SCENES))
    steps = steps or (train_steps(minutes) if minutes else DEFAULT_STEPS)
    train_dir = out / "train"
    model_dir = train_dir / "final"
    timing = train_dir / "demo_train_seconds.json"  # so that a re-run reports the training time it reuses
    reused = (model_dir / "config.json").is_file()
    config = demo_train_config(train_dir, scenes, backbone, attention_mode, steps, seed)
    if not reused:
        train_started = time.perf_counter()
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
                "llm_layers": config.model.vlm["text_config"]["num_hidden_layers"],
                "chair_prompt": config.model.prompts["chair"],
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
        rows.append([backbone, mode, pct(pope["random"]["accuracy"]), pct(pope["adversarial"]["accuracy"]),
                     pct(chair["chair_i"]), f"{result['settings']['train_seconds']:.0f}", f"{params / 1e6:.2f}M",
                     str(model.num_image_tokens)])
    table = markdown_table(["backbone", "attention mode", "POPE random acc", "POPE adv. acc", "CHAIR_I", "train s",
                            "params", "image tokens"], rows)
    (out / "comparison.md").write_text(f"# Backbones and attention modes, {steps} steps each\n\n{table}\n")
    print(table)
    return rows

"""What the demo trains on and how: its scenes, its backbones and its recipe (`train/configs/demo_tiny.yaml`, loaded
with the run's own paths, backbone, steps and seed as overrides)."""

import json
from pathlib import Path

from data.scenes import typical_colour_weights
from train.config import TrainConfig, load_config

RECIPE = "demo_tiny"
# A tiny vision tower at 64 px for each of the six backbones: (timm name, create_model kwargs, feature layer).
# Each gives the LLM a 4x4 grid of image tokens (16-px patches, or a stride-16 stage of the hierarchical ones),
# except LookupViT, whose idea is many cheap lookup tokens (8-px patches, 64) beside a few compressed ones (a grid
# drawn per batch from LOOKUPVIT_GRIDS in training, the paper's multi-resolution recipe, so that the demo can
# measure each grid's accuracy and time on one model; 5x5 at inference unless chosen otherwise). Our
# four are their registered `test_*` variants; timm's two are shrunk here. The recipe's own tower is "vit".
DEMO_BACKBONES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 16, "depth": 4, "embed_dim": 96, "num_heads": 3}, -1),
    "davit": ("davit_tiny", {"embed_dims": (32, 64, 128, 256), "num_heads": (1, 2, 4, 8), "depths": (1, 1, 1, 1)}, 2),
    "lookupvit": ("test_lookupvit", {"train_grid_sizes": [2, 3, 5, 8]}, -1),  # one model for every grid
    "biformer": ("test_biformer", {}, 2),
    "vim": ("test_vim", {}, -1),
    "vig": ("test_vig", {}, -1),
}
DEFAULT_BACKBONE = "vit"
LOOKUPVIT_GRIDS = DEMO_BACKBONES["lookupvit"][1]["train_grid_sizes"]
# optimizer steps of the default recipe per minute on 2 quiet CPU cores: 257-263 measured on one machine, 105-110
# on another (a 2-core AMD EPYC, 74 GFLOP/s in fp32 matmuls); --minutes budgets assume the faster one
STEPS_PER_MINUTE = 260
TRAIN_SHARE = 0.85  # of a --minutes budget; the rest generates data and evaluates (about 1.5 minutes)
# 2000 steps: 7.6 minutes of training at the 4.4 steps/s of a quiet 2-core machine (measured), about 9 in all. Half
# as many do not ground the answers on every seed: POPE random accuracy 91.4 / 74.6 / 85.9% on seeds 0 / 1 / 2 after
# 1000 steps (5.1-6.3 minutes in all), 78.2% on seed 1 with twice the learning rate (measured)
DEFAULT_STEPS = 2000
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


def train_steps(minutes: float, share: float = TRAIN_SHARE) -> int:
    """The training steps a `--minutes` budget buys on the reference machine."""
    return max(20, int(minutes * share * STEPS_PER_MINUTE))


def demo_train_config(out_dir: Path, scenes: Path, backbone: str, attention_mode: str, steps: int,
                      seed: int) -> TrainConfig:
    """The recipe with this run's folders, tower, attention mode, length and seed; warm-up and checkpoints scale
    with the length."""
    vision, vision_kwargs, feature_layer = DEMO_BACKBONES[backbone]
    overrides = {"out_dir": str(out_dir), "data.sources.0.path": str(scenes), "data.sources.1.path": str(scenes),
                 "model.vlm.vision": vision, "model.vlm.vision_kwargs": vision_kwargs,
                 "model.vlm.vision_feature_layer": feature_layer, "model.vlm.attention_mode": attention_mode,
                 "max_steps": steps, "seed": seed, "schedule.warmup_steps": min(30, steps // 10),
                 "checkpoint.save_every": max(50, steps // 4)}
    # JSON is YAML: each value reads back as the override parser expects
    return load_config(RECIPE, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])

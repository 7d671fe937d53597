"""Shared pieces of the `test_train_*` files (no tests here): tiny scenes, a tiny saved model, tiny recipes."""

import os
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file

from train.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "train" / "configs" / "demo_tiny.yaml"

# A from-scratch model small enough for a few dozen CPU steps in seconds.
TINY_MODEL_OVERRIDES = [
    "model.vlm.vision_kwargs={img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.vlm.image_size=32",
    "model.vlm.text_config={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
    "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 512, tie_word_embeddings: true}",
    "model.tokenizer_vocab_size=300",
]


def tiny_overrides(out_dir, scenes_dir, **settings) -> list[str]:
    """Overrides turning the demo recipe into a seconds-long CPU run."""
    values = {"out_dir": str(out_dir), "data.sources.0.path": str(scenes_dir), "data.sources.1.path": str(scenes_dir),
              "batch_size": 8, "max_steps": 6,
              "logging.progress": False, "logging.plot": False, "logging.log_every": 1,
              "schedule.warmup_steps": 0, "checkpoint.save_every": 0, "precision": "fp32", **settings}
    return TINY_MODEL_OVERRIDES + [f"{key}={value}" for key, value in values.items()]


def tiny_config(out_dir, scenes_dir, **settings):
    return load_config(DEMO_RECIPE, tiny_overrides(out_dir, scenes_dir, **settings))


def final_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def make_scenes(folder, num_images: int = 40):
    from data.scenes import generate_scenes

    generate_scenes(folder, num_images, seed=0)
    return Path(folder)


def save_tiny_model(folder):
    """A tiny random VLM + processor saved as a `from_pretrained` folder (the base for stage tests)."""
    from vlm.testing import tiny_vlm

    model, processor = tiny_vlm(seed=3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def run_env():
    # one thread: deterministic and fast for tiny models; never a GPU
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}


def free_port() -> int:
    """A free TCP port for the rendezvous (the default 29500 may be taken by another run on the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

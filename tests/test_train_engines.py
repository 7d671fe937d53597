"""Sharded training engines on CPU processes (gloo), launched through `accelerate launch` with the shipped
configs: FSDP2 and DeepSpeed ZeRO-2/3 on 2 processes end with the weights of 1 process with the same global batch;
an FSDP run killed with SIGKILL resumes exactly, with the same or another number of processes."""

import os
import signal
import subprocess
import sys
import time

import pytest

from train.checkpoint import latest_checkpoint
from train.config import load_config
from train.finetune import train
from test_train_helpers import (DEMO_RECIPE, REPO, final_weights, free_port, make_scenes, run_env, save_tiny_model,
                                tiny_overrides)

pytestmark = pytest.mark.slow

STEPS = 8
ACCELERATE_CONFIGS = REPO / "train" / "configs" / "accelerate"
# the LoRA stage of the LLaVA recipe: adapters on every linear layer of the LLM, vision tower frozen (no dropout:
# its draws depend on how the batch is split over processes)
LORA = ["stage.name=finetune", "stage.lora=true", "stage.train_vision=false", "lora.r=4", "lora.alpha=8",
        "lora.dropout=0.0", "lora.target_modules=all-linear"]
FULL = ["stage.name=full"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base"))


def settings(out_dir, scenes, base, stage, batch_size, *extra):
    values = {"max_steps": STEPS, "checkpoint.save_every": STEPS // 2, "checkpoint.keep_last": 2, "optim.lr": 3e-3,
              "batch_size": batch_size, "model.init_from": base, "model.vlm.text_config": "null",
              "data.split_by_length": 1}
    return tiny_overrides(out_dir, scenes, **values) + stage + list(extra)


def one_process(out_dir, scenes, base, stage):
    train(load_config(DEMO_RECIPE, settings(out_dir, scenes, base, stage, 8)))
    return final_weights(out_dir / "final")


def launch_command(engine: str, processes: int, out_dir, scenes, base, stage, *extra):
    """`accelerate launch --config_file <shipped config>` of the training on `processes` CPU processes."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ACCELERATE_CONFIGS / f"{engine}.yaml"), "--num_processes", str(processes),
                "--mixed_precision", "no", "--main_process_port", str(free_port())]
    if engine == "fsdp":
        launcher += ["--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"]
    batch_size = 8 // processes
    return [*launcher, "-m", "train.finetune", "--config", str(DEMO_RECIPE),
            *settings(out_dir, scenes, base, stage, batch_size, *extra)]


def engine_env():
    # accelerate's GPU launchers, told to run on CPU: gloo processes
    return {**run_env(), "ACCELERATE_USE_CPU": "true"}


def launch(engine: str, processes: int, out_dir, scenes, base, stage, *extra):
    result = subprocess.run(launch_command(engine, processes, out_dir, scenes, base, stage, *extra), cwd=REPO,
                            env=engine_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def one_process_full(tmp_path_factory, scenes, base):
    return one_process(tmp_path_factory.mktemp("one_full"), scenes, base, FULL)


def check_fsdp_run(out_dir, reference):
    """An FSDP run's final weights equal `reference`, it ran FSDP (not DDP in disguise), and its checkpoints hold
    whole tensors in safetensors, nothing pickled."""
    assert "engine: FSDP (fsdp_version 2) on 2 processes" in (out_dir / "train.log").read_text()
    assert max_difference(reference, final_weights(out_dir / "final")) < 1e-5
    newest = latest_checkpoint(out_dir / "checkpoints")
    assert {path.name for path in newest.iterdir()} >= {"trainable.safetensors", "optimizer.safetensors"}
    assert not list(newest.rglob("*.bin")) and not list(newest.rglob("*.pt"))


def test_fsdp2_lora_with_a_frozen_tower_on_two_processes_matches_one(tmp_path, scenes, base):
    reference = one_process(tmp_path / "one", scenes, base, LORA)
    assert max_difference(reference, final_weights(base)) > 1e-3  # the merged adapters changed the weights
    launch("fsdp", 2, tmp_path / "two", scenes, base, LORA)
    check_fsdp_run(tmp_path / "two", reference)


def test_fsdp2_killed_resumes_exactly_with_two_or_one_processes(tmp_path, scenes, base, one_process_full):
    """Full fine-tuning under FSDP2, killed after a checkpoint: resumed by 2 processes, it ends with the weights of
    one uninterrupted process; the same checkpoint resumed by 1 process (same global batch) ends there too."""
    killed = tmp_path / "killed"
    process = subprocess.Popen(launch_command("fsdp", 2, killed, scenes, base, FULL, "checkpoint.save_every=2"),
                               cwd=REPO, env=engine_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while latest_checkpoint(killed / "checkpoints") is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both of its processes
    process.wait()
    newest = latest_checkpoint(killed / "checkpoints")
    assert newest is not None and int(newest.name.split("-")[1]) < STEPS and not (killed / "final").exists()
    snapshot = tmp_path / "snapshot"
    subprocess.run(["cp", "-r", str(killed), str(snapshot)], check=True)

    launch("fsdp", 2, killed, scenes, base, FULL, "checkpoint.save_every=2", "resume=true")
    check_fsdp_run(killed, one_process_full)
    assert max_difference(one_process_full, final_weights(base)) > 1e-3  # trained
    # the same checkpoint, resumed by one process with the same global batch
    again = load_config(DEMO_RECIPE, settings(snapshot, scenes, base, FULL, 8, "checkpoint.save_every=2",
                                              "resume=true"))
    train(again)
    assert max_difference(final_weights(snapshot / "final"), one_process_full) < 1e-5


# ZeRO-3 reduces the gradients partition by partition: float rounding in another order, which 8 Adam steps grow
# to ~4e-5 at most (measured, spread over all tensors); ZeRO-2 lands within 1e-5
@pytest.mark.parametrize("engine, tolerance", [("deepspeed_zero2", 1e-5), ("deepspeed_zero3", 1e-4)])
def test_deepspeed_on_two_processes_matches_one(tmp_path, scenes, base, engine, tolerance, one_process_full):
    pytest.importorskip("deepspeed")
    launch(engine, 2, tmp_path / "two", scenes, base, FULL)  # with a checkpoint at half-way (ZeRO shards)
    assert "engine: DeepSpeed (ZeRO-" + engine[-1] + ") on 2 processes" in (tmp_path / "two" / "train.log").read_text()
    assert max_difference(one_process_full, final_weights(tmp_path / "two" / "final")) < tolerance

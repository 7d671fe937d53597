"""Exact resume: a run killed with SIGKILL and resumed ends with the weights of an uninterrupted run; and
a run under `accelerate launch` with 2 processes matches 1 process with the same global batch."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.checkpoint import latest_checkpoint
from train.config import load_config
from train.finetune import train
from test_train_helpers import (DEMO_RECIPE, REPO, final_weights, free_port, make_scenes, run_env, save_tiny_model,
                                tiny_overrides)

STEPS = 16


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"))


def overrides(out_dir, scenes, *extra):
    settings = {"max_steps": STEPS, "checkpoint.save_every": STEPS // 4, "checkpoint.keep_last": 3, "optim.lr": 3e-3,
                # dropout draws from the RNG every step: a resume must restore the generator states exactly
                "model.vlm.text_config.attention_dropout": 0.2}
    return tiny_overrides(out_dir, scenes, **settings) + list(extra)


def command(out_dir, scenes, *extra, launcher=(sys.executable, "-m", "train.finetune")):
    return [*launcher, "--config", str(DEMO_RECIPE), *overrides(out_dir, scenes, *extra)]


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def recipe(out_dir, scenes, *extra):
    """The same run as `command(...)`, as a config for an in-process `train()`."""
    return load_config(DEMO_RECIPE, overrides(out_dir, scenes, *extra))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, scenes):
    """The final weights of a run that nothing stopped, trained in this process (one thread, like the
    subprocesses)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train(recipe(out, scenes))
    return final_weights(out / "final")


def wait_for_steps(process, out_dir: Path, steps: int):
    deadline = time.time() + 120
    metrics = out_dir / "metrics.jsonl"
    while process.poll() is None and time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended or stalled before step {steps}")


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, scenes, uninterrupted):
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed, scenes), cwd=REPO, env=run_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(killed / "checkpoints") is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    newest = latest_checkpoint(killed / "checkpoints")
    assert newest is not None and int(newest.name.split("-")[1]) < STEPS  # killed mid-run, after a checkpoint
    assert not (killed / "final").exists()

    subprocess.run(command(killed, scenes, "--resume"), check=True, cwd=REPO, env=run_env(), capture_output=True)
    assert max_difference(final_weights(killed / "final"), uninterrupted) < 1e-6
    rows = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == STEPS  # the killed run's extra rows were dropped on resume


VLM = (sys.executable, "-m", "vlm.cli")  # `vlm` of this checkout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_current_step_and_prints_the_resume_command(tmp_path, scenes, uninterrupted, signum):
    out = tmp_path / "run"
    # no periodic checkpoint before the end: the one on disk after the signal is the signal's; a progress line
    # every step (stderr is a pipe here, not a terminal)
    extra = ("checkpoint.save_every=100", "logging.progress_every_s=0")
    process = subprocess.Popen(command(out, scenes, *extra, launcher=(*VLM, "train")), cwd=REPO, env=run_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(process, out, 3)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    newest = latest_checkpoint(out / "checkpoints")
    step = int(newest.name.split("-")[1])
    assert 3 <= step < STEPS and not (out / "final").exists()
    name = signal.Signals(signum).name
    resume = f"vlm train --config {out / 'config.yaml'} --resume"
    assert f"stopped by {name} at step {step}/{STEPS}; checkpoint in {newest}; resume with: {resume}" in stderr
    progress = [line for line in stderr.splitlines() if f"/{STEPS}  loss " in line]
    assert len(progress) == step and all("steps/s  ETA " in line for line in progress)
    assert (out / "train.log").read_text().count(" loss ") == step
    if signum == signal.SIGTERM:
        return
    resumed = subprocess.run([*VLM, *resume.split()[1:]], cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {step} ({newest})" in resumed.stderr
    assert "Writing model shards" not in resumed.stderr  # transformers' bar when it saves final/
    assert max_difference(final_weights(out / "final"), uninterrupted) < 1e-6


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, scenes):
    base = save_tiny_model(tmp_path / "base")
    # the demo recipe's mix: its captions source draws a random reference caption per sample (seeded by the draw)
    settings = ["model.init_from=" + str(base), "model.vlm.text_config=null", "stage.name=full"]
    train(recipe(tmp_path / "one", scenes, *settings, "batch_size=8"))
    # accelerate's --cpu launcher starts one process without mpirun: CPU processes go through torchrun
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", "train.finetune")
    two = command(tmp_path / "two", scenes, *settings, "batch_size=4", launcher=launcher)
    env = {**run_env(), "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(two, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_weights(tmp_path / "one" / "final"), final_weights(tmp_path / "two" / "final")
    assert max_difference(a, b) < 1e-5
    assert max_difference(a, final_weights(base)) > 1e-3  # both trained
    logged = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == STEPS  # only the main process logs


def test_cpu_launch_without_mpirun_is_refused(tmp_path, scenes, monkeypatch):
    # what `accelerate launch --cpu --num_processes 2` hands to its single process
    for name, value in {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="torchrun"):
        train(recipe(tmp_path / "run", scenes))


def test_processes_that_each_run_alone_are_refused(tmp_path, scenes, monkeypatch):
    # what accelerate's GPU launcher gives each process on a machine without a GPU when ACCELERATE_USE_CPU is unset
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(RuntimeError, match="accelerate started 2 processes but each runs alone"):
        train(recipe(tmp_path / "run", scenes))


@pytest.mark.slow
def test_documented_launch_form_ignores_the_users_files(tmp_path, scenes):
    """`accelerate launch "$(which vlm)" train ...` from a folder holding a train.py, data.py and eval.py of the
    user's: the installed entry point does not put the working folder first on sys.path, so ours run."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("train.py", "data.py", "eval.py"):
        (work / name).write_text(f"raise SystemExit('the user\\'s {name} ran')\n")
    vlm = Path(sys.executable).parent / "vlm"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", str(vlm), "train")
    env = {key: value for key, value in run_env().items() if key != "PYTHONPATH"}
    result = subprocess.run([*launcher, "--config", "demo_tiny", *overrides(tmp_path / "run", scenes, "max_steps=2")],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "config.json").is_file()

"""Sharded evaluation under `accelerate launch`: 2 CPU processes (gloo) answer each request once, write the answers
file one process writes, give its metrics, resume an interrupted run with any number of processes, and a process
that does not arrive is named instead of leaving the others waiting."""

import json
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from test_train_helpers import REPO, free_port, make_scenes, run_env, save_tiny_model

pytestmark = pytest.mark.slow
VLM = Path(sys.executable).parent / "vlm"
SPLITS = ("random", "popular", "adversarial")


def evaluate(model, scenes, out, processes: int = 1):
    command = [str(VLM), "eval", "pope", "--model", str(model), "--scenes", str(scenes), "--out", str(out),
               "--batch-size", "4", "--max-new-tokens", "3", "--no-progress"]
    env = run_env()
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), *command]
        env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def lines(path):
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """A tiny model, scenes, and their POPE answers from one process (the reference)."""
    root = tmp_path_factory.mktemp("shards")
    model, scenes = save_tiny_model(root / "model"), make_scenes(root / "scenes", num_images=60)
    return model, scenes, root / "one", evaluate(model, scenes, root / "one")


def test_two_processes_answer_each_request_once_with_the_same_metrics(one_process, tmp_path):
    model, scenes, one, headline = one_process
    assert evaluate(model, scenes, tmp_path, processes=2) == headline
    for split in SPLITS:
        answers = tmp_path / f"pope_{split}.answers.jsonl"
        assert lines(answers) == lines(one / f"pope_{split}.answers.jsonl")  # every request once, in request order
        assert not list(tmp_path.glob("*.rank*"))  # the shards were merged


@pytest.mark.parametrize("processes", [1, 2])
def test_an_interrupted_sharded_run_resumes_with_any_number_of_processes(one_process, tmp_path, processes):
    """What a killed 3-process run leaves: part of the answers file, three shard files (one with a line cut
    short); resumed with 1 or 2 processes it ends with every request once and the same metrics."""
    model, scenes, one, headline = one_process
    for split in SPLITS:
        done = lines(one / f"pope_{split}.answers.jsonl")
        answers = tmp_path / f"pope_{split}.answers.jsonl"
        answers.write_text("\n".join(done[:4]) + "\n")
        for rank, part in enumerate((done[4:7], done[7:9], done[9:10])):
            cut = '{"question_id": 99' if rank == 1 else ""  # killed mid-write
            (tmp_path / f"{answers.name}.rank{rank}").write_text("".join(line + "\n" for line in part) + cut)
        shutil.copy(one / f"{answers.name}.settings.json", tmp_path / f"{answers.name}.settings.json")
    assert evaluate(model, scenes, tmp_path, processes) == headline
    for split in SPLITS:
        resumed, reference = (lines(folder / f"pope_{split}.answers.jsonl") for folder in (tmp_path, one))
        assert sorted(resumed) == sorted(reference)  # each request once, none answered twice or lost
        if processes > 1:
            assert resumed == reference  # a sharded run writes request order
    assert not list(tmp_path.glob("*.rank*"))


def _barrier_with_a_missing_rank(rank: int, port: int, errors):
    import torch.distributed as dist

    from eval.shards import Shard, ShardTimeoutError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shard = Shard(rank, 2, dist.new_group(backend="gloo"), timedelta(seconds=2))
    if rank == 1:  # stuck: never reaches the barrier while rank 0 waits
        time.sleep(6)
        return
    started = time.perf_counter()
    try:
        shard.barrier("answering")
    except ShardTimeoutError as error:
        errors.put((str(error), time.perf_counter() - started))


def test_a_missing_rank_is_named_within_the_timeout():
    import torch.multiprocessing as mp

    errors = mp.get_context("spawn").Queue()
    mp.start_processes(_barrier_with_a_missing_rank, args=(free_port(), errors), nprocs=2, start_method="spawn")
    message, waited = errors.get(timeout=5)
    assert "rank 0 of 2" in message and "'answering'" in message and "1" in message.split("(", 1)[1]
    assert waited < 5

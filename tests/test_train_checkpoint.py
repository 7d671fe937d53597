"""Checkpoints: atomic writes, pruning, RNG round trips, deterministic resumable data order."""

import itertools
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from train import checkpoint
from train.checkpoint import (frozen_fingerprint, latest_checkpoint, list_checkpoints, load_checkpoint,
                              remove_unfinished, rng_state, save_checkpoint, set_rng_state, trainable_state_dict)
from train.sampler import ResumableBatchSampler, mixture_epoch
from train.schedule import build_scheduler, lr_factor
from train.config import ScheduleSpec


class TiedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, like an LLM's embeddings
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.register_buffer("count", torch.zeros(()))


def setup(seed=0):
    torch.manual_seed(seed)
    model = TiedNet()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = build_scheduler(optimizer, ScheduleSpec(name="cosine", warmup_steps=2), max_steps=10)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    loss = model.head(model.embed(torch.arange(5))).pow(2).mean() + torch.rand(()) * 0  # draws from the RNG
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    model.count += 1


def save(root, step, model, optimizer, scheduler, keep_last=2):
    state = {"step": step, "consumed_batches": step, "global_batch_size": 1, "num_processes": 1,
             "frozen_fingerprint": frozen_fingerprint(model)}
    return save_checkpoint(root, step, Accelerator(cpu=True), model, optimizer, scheduler, state, "x: 1\n", keep_last)


def test_trainable_state_skips_frozen_and_stores_tied_weights_once():
    model, _, _ = setup()
    state = trainable_state_dict(model)
    assert set(state) == {"embed.weight", "count"}


def test_save_load_restores_everything(tmp_path):
    model, optimizer, scheduler = setup()
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    path = save(tmp_path, 3, model, optimizer, scheduler)
    lrs_at_save = scheduler.get_last_lr()
    random.random(), np.random.rand(), torch.rand(3)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    train_step(model, optimizer, scheduler)
    after_one_more = model.embed.weight.clone()

    fresh, fresh_optimizer, fresh_scheduler = setup()
    state = load_checkpoint(path, Accelerator(cpu=True), fresh, fresh_optimizer, fresh_scheduler)
    assert state["step"] == 3 and fresh.count.item() == 3
    assert fresh_scheduler.last_epoch == 3 and fresh_scheduler.get_last_lr() == pytest.approx(lrs_at_save)
    random.random(), np.random.rand(), torch.rand(3)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    train_step(fresh, fresh_optimizer, fresh_scheduler)
    assert torch.equal(fresh.embed.weight, after_one_more)  # same optimizer moments and learning rate


def test_checkpoints_hold_no_pickle(tmp_path):
    model, optimizer, scheduler = setup()
    train_step(model, optimizer, scheduler)
    path = save(tmp_path, 1, model, optimizer, scheduler)
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json", ".yaml"}
    readers = {".safetensors": lambda f: load_file(str(f)), ".json": lambda f: json.loads(f.read_text()),
               ".yaml": lambda f: yaml.safe_load(f.read_text())}
    for file in path.iterdir():
        readers[file.suffix](file)  # each file is what its name says, readable without unpickling


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.AdamW(params, lr=0.1, betas=(0.8, 0.95), amsgrad=True),
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    lambda params: torch.optim.Adagrad(params, lr=0.1),
], ids=["adamw", "sgd", "adagrad"])
def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path, make):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = make(model.parameters())
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
    checkpoint.save_optimizer_state(optimizer.state_dict(), tmp_path)
    restored = make(torch.nn.Linear(4, 3).parameters())
    restored.load_state_dict(checkpoint.load_optimizer_state(tmp_path, restored))
    expected, got = optimizer.state_dict(), restored.state_dict()
    assert got["param_groups"] == expected["param_groups"]  # tuples (betas) are tuples again
    assert expected["state"].keys() == got["state"].keys()
    for param_id, values in expected["state"].items():
        assert values.keys() == got["state"][param_id].keys()
        for name, value in values.items():
            assert torch.equal(value, got["state"][param_id][name]) if torch.is_tensor(value) else \
                value == got["state"][param_id][name]


def test_resume_refuses_other_frozen_weights(tmp_path):
    model, optimizer, scheduler = setup(seed=0)
    path = save(tmp_path, 1, model, optimizer, scheduler)
    other, other_optimizer, other_scheduler = setup(seed=1)
    with pytest.raises(RuntimeError, match="frozen weight frozen.weight"):
        load_checkpoint(path, Accelerator(cpu=True), other, other_optimizer, other_scheduler)


def test_interrupted_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = setup()
    good = save(tmp_path, 1, model, optimizer, scheduler)
    train_step(model, optimizer, scheduler)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoint, "save_optimizer_state", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, optimizer, scheduler)
    monkeypatch.undo()
    assert (tmp_path / "ckpt-000002.tmp").is_dir()  # the half-written one...
    assert latest_checkpoint(tmp_path) == good  # ...is never picked up
    fresh, fresh_optimizer, fresh_scheduler = setup()
    assert load_checkpoint(good, Accelerator(cpu=True), fresh, fresh_optimizer, fresh_scheduler)["step"] == 1
    remove_unfinished(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000001"]


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model, optimizer, scheduler = setup()
    for step in range(1, 5):
        save(tmp_path, step, model, optimizer, scheduler, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000003", "ckpt-000004"]
    assert json.loads((tmp_path / "ckpt-000004" / "trainer_state.json").read_text())["step"] == 4


def test_rng_state_is_json_and_round_trips():
    state = json.loads(json.dumps(rng_state()))
    values = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert values[:2] == again[:2] and torch.equal(values[2], again[2])


def test_mixture_weights_and_epochs():
    order = mixture_epoch([10, 20], [2.0, 0.5], seed=0, epoch=0)
    counts = Counter(order.tolist())
    assert len(order) == 30 and all(counts[i] == 2 for i in range(10))
    assert sum(1 for i in counts if i >= 10) == 10 and all(counts[i] == 1 for i in counts if i >= 10)
    assert not np.array_equal(order, mixture_epoch([10, 20], [2.0, 0.5], seed=0, epoch=1))
    assert np.array_equal(order, mixture_epoch([10, 20], [2.0, 0.5], seed=0, epoch=0))


def indices(batches):
    """The sample indices of the sampler's `(index, draw)` batches."""
    return [[index for index, _ in batch] for batch in batches]


def test_sampler_resumes_mid_epoch_and_splits_global_batches():
    def batches(count=9, **kwargs):
        return list(itertools.islice(iter(ResumableBatchSampler([7, 6], [1.0, 1.0], 4, seed=3, **kwargs)), count))

    whole = batches()
    assert batches(start_batch=5) == batches(count=14)[5:]  # resumes mid-epoch (3 batches per epoch)
    halves = [batches(rank=rank, world_size=2) for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == whole  # the same samples with the same draw numbers
    epoch0 = sorted(sum(indices(whole[:3]), []))
    assert len(set(epoch0)) == 12  # no repeats inside an epoch
    draws = [draw for batch in whole for _, draw in batch]
    assert len(set(draws)) == len(draws)  # each draw numbered once, over epochs too


def test_schedule_warmup_then_cosine():
    spec = ScheduleSpec(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, spec, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, spec, 14) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(14, spec, 14) == pytest.approx(0.1)


def test_length_grouping_keeps_the_epoch_and_cuts_padding():
    sizes, weights, batch = [50, 30], [2.0, 1.0], 8
    lengths = np.random.default_rng(0).integers(5, 200, size=sum(sizes))

    def epoch(**kwargs):
        sampler = ResumableBatchSampler(sizes, weights, batch, seed=1, **kwargs)
        return indices(itertools.islice(iter(sampler), sampler.batches_per_epoch))

    plain, grouped = epoch(), epoch(lengths=lengths)
    # the same samples (the epoch's full batches), only rearranged into batches of similar length
    assert sorted(sum(grouped, [])) == sorted(mixture_epoch(sizes, weights, 1, 0)[:len(grouped) * batch].tolist())

    def padded(batches):
        return sum(len(b) * max(lengths[b]) for b in batches)

    assert padded(grouped) < 0.8 * padded(plain)
    # every batch keeps the mix of sources: 100 of 130 samples per epoch come from the first, so 6 or 7 of 8
    assert all(sum(index < 50 for index in b) in (6, 7) for b in grouped)
    assert epoch(lengths=lengths) == grouped  # seeded
    resumed = indices(itertools.islice(iter(ResumableBatchSampler(sizes, weights, batch, seed=1, lengths=lengths,
                                                                  start_batch=4)), 3))
    assert resumed == grouped[4:7]
    halves = [epoch(lengths=lengths, rank=rank, world_size=2) for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == grouped
    with pytest.raises(ValueError, match="3 lengths for 80 samples"):
        ResumableBatchSampler(sizes, weights, batch, seed=1, lengths=[1, 2, 3])

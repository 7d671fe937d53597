"""Training checkpoints: atomic, resumable, without unpickling arbitrary objects.

A checkpoint is a folder `ckpt-000050/` holding
- `trainable.safetensors`: the trainable parameters and the buffers (frozen weights are rebuilt from the
  recipe at resume and checked against `frozen_fingerprint`, so a LoRA checkpoint of a 1B model stays small);
- `optimizer.safetensors` + `optimizer.json`: the optimizer state dict, its tensors (moments, step counts) in the
  first, every other value (hyper-parameters, parameter ids, plain numbers) in the second;
- `scheduler.json`, `trainer_state.json` (step, consumed batches, fingerprint) and `rng_rank{N}.json`
  (python, numpy, torch and CUDA generator states of each process);
- `config.yaml`: the resolved recipe.
It is written as `ckpt-000050.tmp/` and renamed when complete, so a kill during a save leaves the previous
checkpoint untouched; stale `.tmp` folders are ignored and removed.

Nothing in a checkpoint is pickled, so a checkpoint from anywhere can be read without running its code. The one
exception is DeepSpeed: its ZeRO shards are stored through `accelerator.save_state` in `accelerate_state/`, which
pickles: resume those only from checkpoints you wrote yourself.

Weights and optimizer state are full (unsharded) state dicts keyed by parameter name, gathered on the main
process also under FSDP: a checkpoint does not depend on how many processes wrote it, so a run may resume with
another number of processes (same global batch). The price is one whole copy of the trainable state in the main
process's CPU memory per save.
"""

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
STATE_FILE = "trainer_state.json"
SHARDED_STATE_DIR = "accelerate_state"
# whole tensors on the main process's CPU (the other processes get empty dicts)
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ------------------------------------------------------------------------------------------- weights
def trainable_state_dict(model: torch.nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """Trainable parameters and persistent buffers of `model` (CPU, contiguous, by state-dict name), taken
    from `state` (default: `model.state_dict()`). Tied weights (e.g. input and output embeddings) are
    stored once, under their first name: loading one restores both."""
    named = list(model.named_parameters(remove_duplicate=False))  # tied weights under all their names
    trainable = {name for name, param in named if param.requires_grad}
    parameter_names = {name for name, _ in named}
    selected, seen = {}, set()
    for name, tensor in (model.state_dict() if state is None else state).items():
        if name in parameter_names and name not in trainable:
            continue
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        selected[name] = tensor.detach().cpu().contiguous()
    return selected


def frozen_fingerprint(model: torch.nn.Module) -> dict[str, list[float]]:
    """Float64 (sum, sum of squares) of each frozen parameter: cheap, and it tells whether a rebuilt model
    starts from the same frozen weights as the checkpointed run."""
    fingerprint = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            values = param.detach().double()
            fingerprint[name] = [float(values.sum()), float((values * values).sum())]
    return fingerprint


def check_fingerprint(saved: dict, current: dict, checkpoint: Path):
    if saved.keys() != current.keys():
        raise RuntimeError(
            f"{checkpoint}: the frozen parameters differ from this run's model "
            f"({len(saved.keys() ^ current.keys())} names differ): resume with the recipe that wrote the checkpoint"
        )
    for name, (total, squares) in saved.items():
        if not np.allclose(current[name], [total, squares], rtol=1e-9, atol=1e-9):
            raise RuntimeError(
                f"{checkpoint}: frozen weight {name} is not the one the checkpointed run started from "
                "(different seed, base LLM or vision weights?)"
            )


# -------------------------------------------------------------------------------------------- optimizer
def save_optimizer_state(state: dict, folder: Path):
    """Write an optimizer state dict as safetensors (every tensor, keyed `state.<param key>.<name>`) plus JSON
    (the rest, with each tensor's place recorded). Param keys are ids (`optimizer.state_dict()`) or names
    (`get_optimizer_state_dict`); the JSON keeps which."""
    tensors, per_param = {}, []
    for param_key, values in state["state"].items():
        entry = {"key": param_key, "tensors": [], "values": {}}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_key}.{name}"] = value.detach().cpu().contiguous()
                entry["tensors"].append(name)
            else:
                entry["values"][name] = value
        per_param.append(entry)
    save_file(tensors, str(folder / OPTIMIZER_TENSORS_FILE))
    (folder / OPTIMIZER_FILE).write_text(json.dumps({"state": per_param, "param_groups": state["param_groups"]}))


def load_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    """The state dict written by `save_optimizer_state`. JSON has no tuples, so hyper-parameters that are
    tuples in `optimizer` (Adam's betas) become tuples again."""
    tensors = load_file(str(folder / OPTIMIZER_TENSORS_FILE))
    saved = json.loads((folder / OPTIMIZER_FILE).read_text())
    state = {}
    for entry in saved["state"]:
        values = dict(entry["values"])
        values.update({name: tensors[f"state.{entry['key']}.{name}"] for name in entry["tensors"]})
        state[entry["key"]] = values
    groups = saved["param_groups"]
    for group, live in zip(groups, optimizer.param_groups):
        for key, value in group.items():
            if isinstance(live.get(key), tuple):
                group[key] = tuple(value)
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every global random generator's state as JSON-able values."""
    numpy_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------------------------ folders
def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (unfinished `.tmp` folders are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := CHECKPOINT_PATTERN.match(path.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(root) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def remove_unfinished(root):
    """Delete `.tmp` folders left by a save that was interrupted."""
    root = Path(root)
    if root.is_dir():
        for path in root.glob("ckpt-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(root, keep_last: int):
    for path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _uses_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type.value == "DEEPSPEED"


def gathered_state(accelerator, model, frozen: bool = True) -> dict[str, torch.Tensor]:
    """The whole state dict of `model` (without the frozen parameters unless `frozen`), on the main process
    (sharded parameters gathered; the other processes get an empty or partial dict). Every process must call it."""
    if _uses_deepspeed(accelerator):
        return accelerator.get_state_dict(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=not frozen)
    return get_model_state_dict(accelerator.unwrap_model(model), options=options)


def _unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


# -------------------------------------------------------------------------------------- save / load
def save_checkpoint(root, step: int, accelerator, model, optimizer, scheduler, trainer_state: dict,
                    config_yaml: str, keep_last: int) -> Path:
    """Write checkpoint `step` under `root` atomically (every process must call this). Returns its path."""
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    unwrapped = accelerator.unwrap_model(model)
    # frozen weights are not copied: a LoRA run's checkpoint gathers only its adapters and the trainable parts
    weights = trainable_state_dict(unwrapped, gathered_state(accelerator, model, frozen=False))
    optimizer_state = None if _uses_deepspeed(accelerator) else \
        get_optimizer_state_dict(unwrapped, _unwrap_optimizer(optimizer), options=GATHERED)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _uses_deepspeed(accelerator):
        accelerator.save_state(str(tmp / SHARDED_STATE_DIR))
    (tmp / f"rng_rank{accelerator.process_index}.json").write_text(json.dumps(rng_state()))
    if accelerator.is_main_process:
        save_file(weights, str(tmp / TRAINABLE_FILE))
        if optimizer_state is not None:
            save_optimizer_state(optimizer_state, tmp)
        (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # re-saving the same step (e.g. a resumed run): replace it
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one file system
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path, accelerator, model, optimizer, scheduler, fingerprint: dict | None = None) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG state from `path`; returns the trainer
    state (step, consumed batches, ...). Frozen weights must match the fingerprint saved with it (`fingerprint`:
    this run's, when taken before its parameters were sharded).

    Resuming with another number of processes than wrote the checkpoint restores everything but the RNG states,
    which belong to the processes that drew from them: each process then seeds its generators from (step, rank), so
    dropout draws differ from an uninterrupted run's (without dropout, the weights do not)."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    unwrapped = accelerator.unwrap_model(model)
    if fingerprint is None:
        fingerprint = frozen_fingerprint(unwrapped)
    check_fingerprint(state["frozen_fingerprint"], fingerprint, path)
    weights = load_file(str(path / TRAINABLE_FILE))
    # by name only: under FSDP the live parameters are shards
    missing = {name for name, param in unwrapped.named_parameters() if param.requires_grad} - set(weights)
    if missing:
        raise RuntimeError(f"{path}: {len(missing)} trainable tensors are missing, e.g. {sorted(missing)[:3]}")
    if _uses_deepspeed(accelerator):
        unwrapped.load_state_dict(weights, strict=False)
        accelerator.load_state(str(path / SHARDED_STATE_DIR))
    else:
        set_model_state_dict(unwrapped, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(unwrapped, _unwrap_optimizer(optimizer), load_optimizer_state(path, optimizer),
                                 options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
    writers = state.get("num_processes", 1)
    rng_file = path / f"rng_rank{accelerator.process_index}.json"
    if writers == accelerator.num_processes:
        if not rng_file.is_file():
            raise RuntimeError(f"{rng_file} is missing: the checkpoint is incomplete")
        set_rng_state(json.loads(rng_file.read_text()))
    else:
        from accelerate.utils import set_seed

        set_seed(state["step"] * 1000 + accelerator.process_index)
    return state

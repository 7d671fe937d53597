"""Fine-tune a `VisionLanguageModel` with accelerate: stages, LoRA, checkpoints and exact resume.

    accelerate launch -m train.finetune --config train/configs/demo_tiny.yaml [key=value ...]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m train.finetune --config ...  # 2 CPU processes
    ACCELERATE_USE_CPU=1 accelerate launch --config_file train/configs/accelerate/fsdp.yaml --num_processes 2 ...
    vlm train --config ... [key=value ...]                 # the same code in one process
    train.finetune.train(load_config(path))              # from Python; returns out_dir/final

The loss of an optimizer step is the mean over all answer tokens of its global batch (every process and
every accumulated micro-batch), so 1 process x batch 8, 2 processes x batch 4 and batch 4 x 2
accumulation steps compute the same update.
"""

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from vlm.processing import IGNORE_INDEX

from .checkpoint import (frozen_fingerprint, gathered_state, latest_checkpoint, load_checkpoint, remove_unfinished,
                         save_checkpoint)
from .config import TrainConfig, add_arguments, config_from_args, save_config
from .data import TrainingMix, build_datasets, conversation_texts, make_collate, text_lengths
from .lora import has_lora, merge_lora, save_adapter
from .metrics import MetricsLogger, plot_loss_curve
from .modelbuild import build_model, build_tokenizer
from .sampler import ResumableBatchSampler
from .schedule import build_scheduler
from .stages import apply_stage, parameter_groups, set_train_mode


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: training stops instead of corrupting the weights."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after writing a checkpoint of the last finished step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """While active, SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop after the step under way, with a
    checkpoint; a second signal stops at once. Under several processes, one process's request stops them all."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: a signal may arrive in the middle of a print to stderr
        os.write(2, b"\nstopping after this step, with a checkpoint (signal again to stop at once)\n")

    def requested(self, accelerator) -> int | None:
        """The signal number when any process was asked to stop, else None."""
        if accelerator.num_processes == 1:
            return self.signum
        received = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        received = int(accelerator.reduce(received, reduction="max").item())
        return received or None


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (float32)."""
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def resolve_precision(precision: str) -> str:
    """accelerate's `mixed_precision` for the recipe's `precision` ("auto": bf16 on a GPU that has it)."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return "no" if precision == "fp32" else precision


WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
CPU_LAUNCH = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m train.finetune ..."


def _check_cpu_launch():
    """`accelerate launch --cpu --num_processes N` starts ONE process unless it runs through mpirun (it sets
    MASTER_ADDR but no world size): refuse instead of silently training on one process."""
    env = os.environ
    use_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if use_cpu and "MASTER_ADDR" in env and not any(name in env for name in WORLD_SIZE_VARIABLES):
        raise RuntimeError(
            "accelerate launch --cpu with several processes needs mpirun; without it accelerate starts a single "
            f"process. Start CPU processes through torchrun instead: {CPU_LAUNCH}"
        )


def _make_accelerator(config: TrainConfig):
    """accelerate's Accelerator for the launch at hand, with FSDP and DeepSpeed also on CPU processes.

    accelerate turns its FSDP and DeepSpeed plugins on for GPU-type devices only: launched with such a config on CPU
    processes (ACCELERATE_USE_CPU=1, gloo) it would silently train plain DDP. There the plugin the launcher
    describes (its FSDP_* / ACCELERATE_DEEPSPEED_* variables) is turned on here, so that CPU runs take the path
    GPU runs take, and the CPU tests prove it."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(mixed_precision=resolve_precision(config.precision),
                              gradient_accumulation_steps=config.grad_accum * config.data.split_by_length)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes == 1 and launched > 1:
        raise RuntimeError(
            f"accelerate started {launched} processes but each runs alone (no GPU, and ACCELERATE_USE_CPU is not "
            f"set): on CPU processes, launch with ACCELERATE_USE_CPU=1 ({CPU_LAUNCH})")
    engine = next((name for name in ("FSDP", "DEEPSPEED")
                   if os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"), None)
    if engine is None or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return accelerator
    state = accelerator.state
    if engine == "FSDP":
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":
            state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
    else:
        state.deepspeed_plugins = DeepSpeedPlugin()
        state.deepspeed_plugins.set_mixed_precision(accelerator.mixed_precision)
        state.deepspeed_plugins.select(_from_accelerator_state=True)
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType[engine]
    return accelerator


def parameters_sharded(accelerator) -> bool:
    """Whether each process holds only a shard of the parameters (FSDP, DeepSpeed ZeRO-3)."""
    kind = accelerator.distributed_type.value
    return kind == "FSDP" or (kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3)


def _engine_name(accelerator) -> str:
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        return f"FSDP (fsdp_version {accelerator.state.fsdp_plugin.fsdp_version})"
    if kind == "DEEPSPEED":
        return f"DeepSpeed (ZeRO-{accelerator.state.deepspeed_plugin.zero_stage})"
    return f"DDP ({kind})"


def _check_distributed_setup(accelerator, config: TrainConfig):
    """Refuse set-ups the run cannot serve: DeepSpeed needs a fixed micro-batch size."""
    if accelerator.distributed_type.value == "DEEPSPEED" and config.data.split_by_length > 1:
        raise ValueError("data.split_by_length > 1 gives micro-batches of varying sizes, which DeepSpeed's fixed "
                         "micro-batch size cannot describe: set it to 1 for DeepSpeed runs")


def _prepare_out_dir(config: TrainConfig, accelerator) -> tuple[Path, Path | None]:
    out_dir = Path(config.out_dir)
    checkpoints = out_dir / "checkpoints"
    resume_from = None
    if accelerator.is_main_process:
        remove_unfinished(checkpoints)
    accelerator.wait_for_everyone()
    existing = latest_checkpoint(checkpoints)
    if config.resume:
        resume_from = existing
        if resume_from is None and accelerator.is_main_process:
            print(f"resume: no checkpoint in {checkpoints}, starting from step 0", file=sys.stderr)
    elif existing is not None:
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints (newest {existing.name}): pass resume=true (--resume) to "
            "continue that run, or choose another out_dir"
        )
    return out_dir, resume_from


def _run_tokenizer(config: TrainConfig, out_dir: Path, datasets, accelerator):
    """The run's tokenizer, saved once in `out_dir/tokenizer` by the main process (a resumed run and the
    other processes read it back, so a trained vocabulary never changes mid-run)."""
    from transformers import AutoTokenizer

    if config.model.init_from is not None:
        return None
    folder = out_dir / "tokenizer"
    if accelerator.is_main_process and not (folder / "tokenizer_config.json").is_file():
        tokenizer = build_tokenizer(config.model, lambda: conversation_texts(datasets))
        tmp = out_dir / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(folder)


def _save_base(model, processor, out_dir: Path, accelerator) -> Path:
    """The model a LoRA run starts from, saved once as `out_dir/base` (the adapter applies on top of it)."""
    base = out_dir / "base"
    if accelerator.is_main_process and not (base / "config.json").is_file():
        tmp = out_dir / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        os.replace(tmp, base)
    accelerator.wait_for_everyone()
    return base


def _save_final(model, processor, config: TrainConfig, out_dir: Path, base_dir: Path | None) -> Path:
    """Adapter (when LoRA) and the merged, plain `save_pretrained` model + processor in `out_dir/final`."""
    if has_lora(model):
        adapter_dir = out_dir / "adapter"
        save_adapter(model, adapter_dir)
        (adapter_dir / "base_model.json").write_text(json.dumps({"base_model_dir": str(base_dir)}))
        merge_lora(model)
    final = out_dir / "final"
    tmp = out_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    save_config(config, tmp / "train_config.yaml")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def optimizer_step(accelerator, model, optimizer, micro_batches, config: TrainConfig, step: int,
                   trainable_params) -> tuple[float, float | None, int]:
    """Forward/backward over the micro-batches of one step (`grad_accum` batches, each cut in
    `data.split_by_length` parts), then one optimizer update.

    Returns (mean loss per answer token over the global batch, gradient norm before clipping, number of
    answer tokens in the global batch)."""
    local_tokens = sum(count_label_tokens(batch["labels"]) for batch in micro_batches)
    global_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum").item())
    if global_tokens == 0:
        raise ValueError(f"step {step}: the batch has no answer token to learn from (check the data's labels)")
    loss_total = torch.zeros((), device=accelerator.device)
    grad_norm = None
    for batch in micro_batches:
        with accelerator.accumulate(model):
            labels = batch.pop("labels")
            outputs = model(**{key: value.to(accelerator.device) for key, value in batch.items()}, use_cache=False)
            loss_sum = token_loss_sum(outputs.logits, labels)
            # every process must take the same branch, or the others would wait for it forever
            not_finite = torch.tensor(float(not torch.isfinite(loss_sum)), device=accelerator.device)
            if accelerator.reduce(not_finite, "sum").item():
                raise NonFiniteLossError(
                    f"the loss is not finite at step {step} (NaN or inf): stopping. Lower the learning rate, "
                    "check the data, or train in float32 (precision=fp32)"
                )
            # DDP averages gradients over processes and accelerate divides the loss by the number of micro-batches:
            # undo both so the gradient is that of the mean over all answer tokens of the global batch.
            accelerator.backward(loss_sum * (accelerator.num_processes * accelerator.gradient_accumulation_steps
                                             / global_tokens))
            loss_total += loss_sum.detach()
            if accelerator.sync_gradients and config.optim.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(trainable_params, config.optim.max_grad_norm))
            optimizer.step()  # accelerate skips it until the last micro-batch
            optimizer.zero_grad(set_to_none=True)
    loss = accelerator.reduce(loss_total, "sum").item() / global_tokens
    return loss, grad_norm, global_tokens


def train(config: TrainConfig, datasets=None) -> Path:
    """Run the recipe `config` (in this process, or in each process of `accelerate launch`); returns the
    folder of the final model (`out_dir/final`), loadable with `VisionLanguageModel.from_pretrained`.

    `datasets` (optional): map-style datasets of sample dicts used instead of `config.data.sources`
    (one per source, for the weights; or any list, each weighted 1.0).
    SIGINT / SIGTERM stop it after the step under way with a checkpoint, raising `TrainingInterrupted`."""
    from transformers.utils import logging as transformers_logging

    bars_were_on = transformers_logging.is_progress_bar_enabled()
    if not config.logging.library_progress:  # transformers' bars for each weight save
        transformers_logging.disable_progress_bar()
    try:
        return _train(config, datasets)
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()


def _train(config: TrainConfig, datasets) -> Path:
    from accelerate.utils import set_seed

    config.validate(check_data=datasets is None)
    _check_cpu_launch()
    accelerator = _make_accelerator(config)
    _check_distributed_setup(accelerator, config)
    out_dir, resume_from = _prepare_out_dir(config, accelerator)
    set_seed(config.seed)

    if datasets is None:
        datasets = build_datasets(config.data)
    weights = [s.weight for s in config.data.sources] if len(config.data.sources) == len(datasets) \
        else [1.0] * len(datasets)
    tokenizer = _run_tokenizer(config, out_dir, datasets, accelerator)

    # Built identically (same seed) by every process and on resume; the checkpoint's fingerprint checks it.
    set_seed(config.seed)
    model, processor = build_model(config.model, tokenizer)
    base_dir = Path(config.model.init_from) if config.model.init_from else None
    if config.stage.name == "finetune" and config.stage.lora and base_dir is None:
        base_dir = _save_base(model, processor, out_dir, accelerator)
    apply_stage(model, config.stage, config.lora)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim), lr=config.optim.lr,
                                  betas=tuple(config.optim.betas), eps=config.optim.eps)
    # The scheduler is stepped by hand once per optimizer step (accelerate would step it once per process).
    scheduler = build_scheduler(optimizer, config.schedule, config.max_steps)
    if accelerator.state.deepspeed_plugin is not None:
        # DeepSpeed accumulates and clips inside its engine, and our data loader is not passed to prepare(), so
        # the recipe's batch sizes, accumulation and clipping are written into its config here
        accumulation = accelerator.gradient_accumulation_steps
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=config.batch_size, gradient_accumulation_steps=accumulation,
            train_batch_size=config.batch_size * accelerator.num_processes * accumulation,
            gradient_clipping=config.optim.max_grad_norm or 0.0)
    fingerprint = frozen_fingerprint(model)  # of whole tensors: taken before FSDP shards them
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    step, consumed_batches = 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, accelerator, model, optimizer, scheduler, fingerprint)
        step, consumed_batches = state["step"], state["consumed_batches"]
        if state["global_batch_size"] != config.batch_size * accelerator.num_processes:
            raise ValueError(
                f"{resume_from} was written with a global batch of {state['global_batch_size']} samples; this run has "
                f"{config.batch_size * accelerator.num_processes}: keep batch_size x processes unchanged to resume"
            )
    if accelerator.is_main_process:
        save_config(config, out_dir / "config.yaml")

    lengths = None
    if config.data.group_by_length:
        lengths = [length for index, dataset in enumerate(datasets) for length in text_lengths(dataset, index)]
    sampler = ResumableBatchSampler(
        [len(d) for d in datasets], weights, config.batch_size * accelerator.num_processes, config.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes, start_batch=consumed_batches,
        lengths=lengths,
    )
    loader = torch.utils.data.DataLoader(
        TrainingMix(datasets, config.seed), batch_sampler=sampler, num_workers=config.data.num_workers,
        collate_fn=partial(make_collate(processor, config.data.max_length or processor.max_length).split_by_length,
                           parts=config.data.split_by_length),
        # its own generator: creating the iterator must not draw from the global RNG that the checkpoint restores
        generator=torch.Generator().manual_seed(config.seed),
    )
    batches = iter(loader)
    logger = MetricsLogger(out_dir, config, accelerator.is_main_process, start_step=step)
    if accelerator.num_processes > 1:
        logger.message(f"engine: {_engine_name(accelerator)} on {accelerator.num_processes} processes")
    if resume_from is not None:
        logger.message(f"resumed from step {step} ({resume_from})")
    config_yaml = (out_dir / "config.yaml").read_text() if accelerator.is_main_process else ""
    trainable_params = [p for p in model.parameters() if p.requires_grad]

    def checkpoint(step: int) -> Path:
        trainer_state = {"step": step, "consumed_batches": consumed_batches,
                         "global_batch_size": config.batch_size * accelerator.num_processes,
                         "num_processes": accelerator.num_processes, "frozen_fingerprint": fingerprint}
        return save_checkpoint(out_dir / "checkpoints", step, accelerator, model, optimizer, scheduler, trainer_state,
                               config_yaml, config.checkpoint.keep_last)

    set_train_mode(unwrapped)
    saved_step = step
    with StopRequest() as stop:
        while step < config.max_steps:
            started = time.perf_counter()
            micro_batches = [part for _ in range(config.grad_accum) for part in next(batches)]
            consumed_batches += config.grad_accum
            lr = config.optim.lr * scheduler.lr_lambdas[0](step)
            lrs = dict(zip([group["name"] for group in optimizer.param_groups], scheduler.get_last_lr()))
            loss, grad_norm, tokens = optimizer_step(accelerator, model, optimizer, micro_batches, config, step + 1,
                                                     trainable_params)
            scheduler.step()
            step += 1
            logger.log(step, loss=loss, lr=lr, lrs=lrs, grad_norm=grad_norm, tokens=tokens,
                       samples=config.batch_size * accelerator.num_processes * config.grad_accum,
                       seconds=time.perf_counter() - started, epoch=sampler.epoch_of(consumed_batches - 1))
            every = config.checkpoint.save_every
            if every and (step % every == 0 or step == config.max_steps):
                checkpoint(step)
                saved_step = step
            signum = stop.requested(accelerator)
            if signum is not None and step < config.max_steps:
                where = checkpoint(step) if step > saved_step else latest_checkpoint(out_dir / "checkpoints")
                message = (f"stopped by {signal.Signals(signum).name} at step {step}/{config.max_steps}; checkpoint in "
                           f"{where}; resume with: vlm train --config {out_dir / 'config.yaml'} --resume")
                logger.message(message)
                logger.close()
                raise TrainingInterrupted(message, signum)
    logger.close()

    final = out_dir / "final"
    whole = gathered_state(accelerator, model) if parameters_sharded(accelerator) else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if whole is not None:  # shards cannot be merged or saved: a plain copy of the model takes the whole state
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # or from_pretrained would build the copy partitioned, waiting for the others
            unwrapped, _ = build_model(config.model, tokenizer)
            apply_stage(unwrapped, config.stage, config.lora)
            unwrapped.load_state_dict(whole)
        final = _save_final(unwrapped, processor, config, out_dir, base_dir)
        if config.logging.plot:
            plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss.png")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        final = train(config_from_args(parser.parse_args(argv)))
    except TrainingInterrupted as interrupt:  # its message, with the resume command, is printed already
        sys.exit(128 + interrupt.signum)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final model: {final}")


if __name__ == "__main__":
    main()

"""Training throughput and memory of the shipped recipes, with the time of one step split into vision
(tower + connector), LLM forward, backward and optimizer.

    python -m benchmarks.training                         # demo_tiny and smollm2_lora_scenes on this machine
    python -m benchmarks.training --recipes demo_tiny --steps 20 --batch-size 16 --threads 2
    python -m benchmarks.training --recipes demo_tiny --processes 1 2 --batch-size 32 --threads 2
    python -m benchmarks.training --recipes demo_tiny --processes 1 2 --engines ddp fsdp deepspeed_zero2 --threads 2

Each recipe runs in its own process, so its peak memory (resident set on CPU, allocated memory on a GPU)
is its own. The model, stage, data and optimizer are built by the same functions as `train.finetune`. Steps are
timed by `benchmarks.timing.time_call` after one warm-up step; every figure is the median over the timed steps,
and steps that vary widely are reported on stderr.

`--processes 1 2` measures data-parallel training instead: the real `train.finetune` of each recipe at one global
batch, in 1 process (with all `--threads`) and under `accelerate launch` in N CPU processes (gloo; the threads
shared out). Start-up (tokenizer, datasets, process spawn) is taken out by running each twice, for `--steps`
and 4x as many steps, and dividing the extra samples by the extra time. `--engines` picks the shipped accelerate
configs the multi-process runs launch with (`ddp`: plain `--multi_gpu`; `fsdp`, `deepspeed_zero2`, ...:
`train/configs/accelerate/<name>.yaml`); every run, the 1-process one included, then uses `data.split_by_length=1`,
which DeepSpeed needs.
"""

import argparse
import json
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.timing import Timing, print_warnings, time_call
from train.config import load_config

DEFAULT_SMOLLM2_DIR = Path("runs/assets/smollm2")


class SectionTimer:
    """Adds the wall time spent inside `module`'s forward to `self.seconds` (through forward hooks)."""

    def __init__(self, *modules):
        self.seconds, self._start = 0.0, None
        for module in modules:
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)

    def _enter(self, *args):
        self._start = time.perf_counter()

    def _leave(self, *args):
        self.seconds += time.perf_counter() - self._start


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_recipe(recipe: str, overrides: list[str], steps: int, threads: int) -> dict:
    """Time `steps` optimizer steps (after one warm-up step) of `recipe` with `overrides`."""
    import torch

    from train.data import build_datasets, conversation_texts, make_collate
    from train.finetune import resolve_precision, token_loss_sum
    from train.modelbuild import build_model, build_tokenizer
    from train.stages import apply_stage, parameter_groups, set_train_mode

    torch.set_num_threads(threads)
    config = load_config(recipe, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    datasets = build_datasets(config.data)
    torch.manual_seed(config.seed)
    tokenizer = None if config.model.init_from else build_tokenizer(config.model, lambda: conversation_texts(datasets))
    model, processor = build_model(config.model, tokenizer)
    apply_stage(model, config.stage, config.lora)
    model.to(device)
    set_train_mode(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.optim), lr=config.optim.lr)
    collate = make_collate(processor, config.data.max_length or processor.max_length)
    vision = SectionTimer(model.vision_tower, model.connector)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(config.precision))

    samples = [datasets[0][i % len(datasets[0])] for i in range(config.batch_size)]
    batch = collate(samples)
    labels = batch.pop("labels").to(device)
    batch = {key: value.to(device) for key, value in batch.items()}
    phases = {"vision_s": [], "llm_forward_s": [], "backward_s": [], "optimizer_s": []}

    def train_step():
        vision.seconds = 0.0
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = token_loss_sum(model(**batch).logits, labels) / (labels != -100).sum()
        _sync(device)
        forward_done = time.perf_counter()
        loss.backward()
        _sync(device)
        backward_done = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        phases["vision_s"].append(vision.seconds)
        phases["llm_forward_s"].append(forward_done - started - vision.seconds)
        phases["backward_s"].append(backward_done - forward_done)
        phases["optimizer_s"].append(time.perf_counter() - backward_done)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = time_call(train_step, repeats=steps, warmup=1, what=f"{recipe} step")
    print_warnings(step)
    # train_step noted the warm-up step's phases too: summarise the timed steps' only
    phase_medians = {key: Timing(f"{recipe} {key}", tuple(values[-steps:])).median for key, values in phases.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "recipe": recipe, "device": device.type, "threads": threads, "batch_size": config.batch_size,
        "sequence_length": int(batch["input_ids"].shape[1]), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_m": trainable / 1e6, "samples_per_s": config.batch_size / step.median, "step_s": step.median,
        "step_spread": step.spread, **phase_medians, "peak_memory_mib": peak_mib,
    }


def _child(queue, *args):
    try:
        queue.put(bench_recipe(*args))
    except Exception as error:  # reported by the parent, which keeps benchmarking the other recipes
        queue.put({"recipe": args[0], "error": f"{type(error).__name__}: {error}"})


def run_isolated(recipe: str, overrides: list[str], steps: int, threads: int) -> dict:
    """`bench_recipe` in a fresh process (its own peak memory)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, recipe, overrides, steps, threads))
    process.start()
    result = queue.get()
    process.join()
    return result


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs" / "accelerate"


def cpu_launcher(processes: int, engine_flags=("--multi_gpu",)) -> list[str]:
    """`accelerate launch` of `processes` CPU processes (accelerate's torchrun launchers; run them with
    ACCELERATE_USE_CPU=true), on a free rendezvous port; the program and its arguments follow."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", *engine_flags, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def launch_training(recipe: str, overrides: list[str], processes: int, threads: int, out_dir: Path,
                    engine: str = "ddp", fsdp_layer: str = "LlamaDecoderLayer") -> float:
    """Wall seconds of one `train.finetune` run of `recipe` on `processes` CPU processes under `engine`."""
    command = [sys.executable, "-m", "train.finetune"]
    if processes > 1:
        engine_flags = ["--multi_gpu"]
        if engine != "ddp":
            engine_flags = ["--config_file", str(ACCELERATE_CONFIGS / f"{engine}.yaml")]
        if engine == "fsdp":
            engine_flags += ["--fsdp_transformer_layer_cls_to_wrap", fsdp_layer]
        command = [*cpu_launcher(processes, engine_flags), "-m", "train.finetune"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": str(max(1, threads // processes))}
    started = time.perf_counter()
    result = subprocess.run([*command, "--config", recipe, *overrides, f"out_dir={out_dir}", "logging.progress=false",
                             "logging.plot=false"], env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{recipe} on {processes} processes ({engine}) failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def data_parallel_rows(recipe: str, overrides: list[str], process_counts: list[int], steps: int, batch_size: int,
                       threads: int, tmp: Path, engines: tuple[str, ...] = ("ddp",)) -> list[dict]:
    """samples/s of `recipe` at global batch `batch_size` on each process count (the multi-process counts under
    each of `engines`), start-up taken out."""
    if engines != ("ddp",):
        overrides = [*overrides, "data.split_by_length=1"]
    rows = []
    for processes in process_counts:
        if batch_size % processes:
            raise ValueError(f"--batch-size {batch_size} does not split over {processes} processes")
        run = [*overrides, f"batch_size={batch_size // processes}", "checkpoint.save_every=100000"]
        for engine in engines if processes > 1 else ("one process",):
            short, long = (launch_training(recipe, [*run, f"max_steps={n}"], processes, threads,
                                           tmp / f"{processes}-{engine}-{n}", engine) for n in (steps, 4 * steps))
            samples_per_s = 3 * steps * batch_size / (long - short)
            rows.append({"recipe": recipe, "processes": processes, "engine": engine, "global_batch": batch_size,
                         "samples_per_s": samples_per_s, "startup_s": short - steps * batch_size / samples_per_s})
            print(f"{recipe:<22} {processes} process(es), {engine:<15} global batch {batch_size}: "
                  f"{samples_per_s:7.1f} samples/s ({samples_per_s / rows[0]['samples_per_s']:.2f}x the first), "
                  f"start-up {rows[-1]['startup_s']:.1f} s", flush=True)
    return rows


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['recipe']:<22} failed: {row['error']}"
    return (f"{row['recipe']:<22} {row['device']:>4} b={row['batch_size']:<3} L={row['sequence_length']:<4} "
            f"{row['trainable_m']:7.2f}M/{row['params_m']:7.2f}M trainable  {row['samples_per_s']:7.2f} samples/s  "
            f"step {row['step_s'] * 1000:8.1f} ms: vision {row['vision_s'] * 1000:7.1f}, LLM fwd "
            f"{row['llm_forward_s'] * 1000:7.1f}, bwd {row['backward_s'] * 1000:7.1f}, optim "
            f"{row['optimizer_s'] * 1000:6.1f} (medians)  peak {row['peak_memory_mib']:7.0f} MiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["demo_tiny", "smollm2_lora_scenes"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per recipe (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--scenes", type=Path, default=None, help="a `vlm data scenes` folder (default: 40 new scenes)")
    parser.add_argument("--smollm2", type=Path, default=DEFAULT_SMOLLM2_DIR,
                        help="converted SmolLM2 folder (converted there first when missing)")
    parser.add_argument("--processes", type=int, nargs="+", default=None,
                        help="instead: data-parallel samples/s of the real training on these CPU process counts")
    parser.add_argument("--engines", nargs="+", default=["ddp"],
                        help="with --processes: ddp, or shipped accelerate configs (fsdp, deepspeed_zero2, ...)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        scenes = args.scenes
        if scenes is None:
            from data.scenes import generate_scenes

            scenes = Path(tmp) / "scenes"
            generate_scenes(scenes, 40, seed=0)
        rows = []
        for recipe in args.recipes:
            sources = load_config(recipe).data.sources  # every source of a scenes recipe reads the scenes folder
            overrides = [f"data.sources.{index}.path={scenes}" for index in range(len(sources))]
            if recipe.startswith("smollm2"):
                from train.assets import convert_smollm2

                overrides.append(f"model.llm={convert_smollm2(args.smollm2)}")
            if args.processes:
                rows += data_parallel_rows(recipe, overrides, args.processes, args.steps, args.batch_size,
                                           args.threads, Path(tmp), tuple(args.engines))
                continue
            rows.append(run_isolated(recipe, [*overrides, f"batch_size={args.batch_size}"], args.steps, args.threads))
            print(format_row(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

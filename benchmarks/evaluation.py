"""Sharded evaluation throughput: requests/s of the real `vlm eval pope` in 1 process and under `accelerate launch`
in N CPU processes (gloo), the threads shared out.

    python -m benchmarks.evaluation --processes 1 2 --threads 2               # a tiny random VLM, new scenes
    python -m benchmarks.evaluation --model runs/demo/model --processes 1 2 --images 100

Start-up (imports, model load, process spawn) is taken out by evaluating two scene sets, `--images` and 4x as
many, and dividing the extra requests by the extra time. The answers files of every process count are compared:
a sharded run must answer what one process answers.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.training import cpu_launcher

VLM = Path(sys.executable).parent / "vlm"


def evaluate(model: Path, scenes: Path, out: Path, processes: int, threads: int, batch_size: int) -> float:
    """Wall seconds of one `vlm eval pope` of `scenes` on `processes` CPU processes."""
    command = [str(VLM), "eval", "pope", "--model", str(model), "--scenes", str(scenes), "--out", str(out),
               "--batch-size", str(batch_size), "--no-progress"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(1, threads // processes))}
    if processes > 1:
        command = [*cpu_launcher(processes), *command]
        env["ACCELERATE_USE_CPU"] = "true"
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"vlm eval pope on {processes} processes failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def answers(out: Path) -> dict[str, list[str]]:
    return {path.name: path.read_text().splitlines() for path in sorted(out.glob("pope_*.answers.jsonl"))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a saved VLM folder (default: a tiny random one)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all, shared out over the processes")
    parser.add_argument("--images", type=int, default=40, help="scenes of the short run (the long one has 4x)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from data.scenes import generate_scenes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from vlm.testing import tiny_vlm

            model = tmp / "model"
            tiny, processor = tiny_vlm(seed=0)
            tiny.save_pretrained(model)
            processor.save_pretrained(model)
        scene_sets = {n: tmp / f"scenes{n}" for n in (args.images, 4 * args.images)}
        for n, folder in scene_sets.items():
            generate_scenes(folder, n, seed=0)
        first, reference = None, None
        for processes in args.processes:
            seconds, counts = [], []
            for n, scenes in scene_sets.items():
                out = tmp / f"out-{processes}-{n}"
                seconds.append(evaluate(model, scenes, out, processes, args.threads, args.batch_size))
                counts.append(sum(len(lines) for lines in answers(out).values()))
                if n == 4 * args.images:
                    if reference is None:
                        reference = answers(out)
                    elif answers(out) != reference:
                        raise AssertionError(f"{processes} processes answered differently from {args.processes[0]}")
            per_s = (counts[1] - counts[0]) / (seconds[1] - seconds[0])
            first = first or per_s
            print(f"vlm eval pope, {processes} process(es) x {max(1, args.threads // processes)} thread(s): "
                  f"{per_s:7.1f} requests/s ({per_s / first:.2f}x the first; {counts[1]} requests in "
                  f"{seconds[1]:.1f} s with start-up), answers identical", flush=True)


if __name__ == "__main__":
    main()

"""CPU benchmark of the tiny backbones against DeiT-Ti (timm `vit_tiny_patch16_224`).

    python -m benchmarks.backbones --sizes 224 512 1024 --threads 2

For each model and square input size, batch 1, fp32, eager PyTorch:
- latency: median wall time of several forward passes after warm-up (`benchmarks.timing`), with the model's
  default attention (fused SDPA where the model uses it), under `torch.no_grad()` and a fixed thread count; the
  timed passes alternate between the models so that a busy machine slows all of them alike, and repeats that
  spread widely are reported on stderr;
- peak memory: the largest total size of live tensor storages created during one no-grad forward pass,
  counted exactly by a TorchDispatchMode (`PeakTensorMemory`). Parameters, the input and allocator overhead
  are not counted. Reported twice: with attention materialised (fused attention off, the setting behind the
  published memory claims) and with the default fused attention;
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` with fused attention off (it cannot see inside fused
  SDPA on CPU), given as GMACs (1 MAC = 2 FLOPs). It counts matmuls and convolutions only: the recurrences
  of Vim/ViG scans are not included.
Ratios are against DeiT-Ti at the same size. LookupViT is also compared, by FLOPs, with the ViT of the same
width at each compressed grid.
"""

import argparse
import importlib
import weakref
from functools import partial

import timm
import torch
from timm.layers import set_fused_attn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.timing import Timing, print_warnings, time_calls

BASELINE = "vit_tiny_patch16_224"
# Model name -> module that registers it with timm (None: timm's own model).
MODELS = {
    BASELINE: None,
    "davit_tiny": None,
    "biformer_tiny": "vision_backbones.biformer",
    "lookupvit_tiny_patch16_224": "vision_backbones.lookupvit",
    "vim_tiny_patch16_224": "vision_backbones.vim",
    "vig_tiny_patch16_224": "vision_backbones.vig",
}
LOOKUP_GRIDS = (3, 5, 7, 10)


class PeakTensorMemory(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created by operators run inside the mode and their peak.

    A storage is counted once, when an operator first returns it (views and in-place results share an input's
    storage and are not counted again), and released when Python frees it.
    """

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        input_storages = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self._live or key in input_storages or storage.nbytes() == 0:
                continue
            self._live.add(key)
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def build(name: str, size: int, fused: bool) -> torch.nn.Module:
    """Headless eval-mode model for `size` x `size` inputs, with fused attention on or off."""
    set_fused_attn(fused)
    try:
        model = timm.create_model(name, num_classes=0, img_size=size)
    except TypeError:  # models without absolute position embeddings take any size and no img_size argument
        model = timm.create_model(name, num_classes=0)
    set_fused_attn(True)
    return model.eval()


@torch.no_grad()
def latencies(models: dict[str, torch.nn.Module], x: torch.Tensor, warmup: int, repeats: int,
              budget_s: float) -> dict[str, Timing]:
    """Forward time of each model, the models interleaved (`time_calls`). One round after the warm-up sizes the
    run: `repeats` rounds, fewer (down to 3) when a round is slow, to stay near `budget_s`."""
    forwards = {name: partial(model, x) for name, model in models.items()}
    first_round = time_calls(forwards, repeats=1, warmup=warmup)
    round_s = sum(timing.minimum for timing in first_round.values())
    rounds = min(repeats, max(3, int(budget_s / round_s)))
    return time_calls(forwards, repeats=rounds, warmup=0)


@torch.no_grad()
def peak_memory_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    with PeakTensorMemory() as probe:
        model(x)
    return probe.peak / 2 ** 20


@torch.no_grad()
def gmacs(model: torch.nn.Module, x: torch.Tensor, **forward_kwargs) -> float:
    with FlopCounterMode(display=False) as counter:
        model(x, **forward_kwargs)
    return counter.get_total_flops() / 2e9


def available(names: list[str]) -> list[str]:
    """The models whose registering module imports; the others are reported and skipped."""
    usable = []
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
        module = MODELS[name]
        if module is not None:
            try:
                importlib.import_module(module)
            except ImportError as error:
                print(f"skipping {name}: {module} does not import ({error})")
                continue
        usable.append(name)
    return usable


def measure(names: list[str], size: int, args: argparse.Namespace) -> dict[str, dict]:
    """Latency, peak memory (eager and fused) and GMACs of every model at one input size."""
    x = torch.randn(1, 3, size, size)
    fused = {name: build(name, size, fused=True) for name in names}
    timings = latencies(fused, x, args.warmup, args.repeats, args.budget)
    results = {}
    for name in names:
        eager = build(name, size, fused=False)
        results[name] = dict(latency=1000 * timings[name].median, latency_timing=timings[name],
                             memory_eager=peak_memory_mib(eager, x), memory_fused=peak_memory_mib(fused[name], x),
                             gmacs=gmacs(eager, x))
    return results


def lookup_vs_vit(sizes: list[int]) -> None:
    """FLOPs of LookupViT-Ti at several compressed grids over those of ViT-Ti (same width), fused attention off."""
    print("\nLookupViT-Ti / ViT-Ti FLOPs by compressed grid (default grid marked *):")
    print(f"{'size':>6} " + " ".join(f"{g}x{g}".rjust(8) for g in LOOKUP_GRIDS))
    for size in sizes:
        x = torch.randn(1, 3, size, size)
        lookup = build("lookupvit_tiny_patch16_224", size, fused=False)
        vit = gmacs(build(BASELINE, size, fused=False), x)
        default = lookup.compressed_grid[0]
        cells = [f"{gmacs(lookup, x, compressed_grid=g) / vit:.3f}{'*' if g == default else ' '}" for g in LOOKUP_GRIDS]
        print(f"{size:>6} " + " ".join(c.rjust(8) for c in cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed runs per model and size")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = available(list(dict.fromkeys([BASELINE, *args.models])))

    print(f"batch 1, fp32, {args.threads} threads, torch {torch.__version__}, timm {timm.__version__}")
    print("latency: median ms, fused attention; memory: peak live tensor MiB (eager = attention materialised);"
          " GMACs: FlopCounterMode, fused attention off, scans not counted")
    header = (f"{'model':<28}{'size':>6}{'ms':>10}{'xDeiT':>7}{'MiB eager':>11}{'xDeiT':>7}"
              f"{'MiB fused':>11}{'xDeiT':>7}{'GMACs':>9}{'xDeiT':>7}")
    print(header)
    results = {}
    for size in args.sizes:
        for name, row in measure(names, size, args).items():
            results[name, size] = row
            base = results[BASELINE, size]
            print(f"{name:<28}{size:>6}{row['latency']:>10.1f}{row['latency'] / base['latency']:>7.2f}"
                  f"{row['memory_eager']:>11.1f}{row['memory_eager'] / base['memory_eager']:>7.2f}"
                  f"{row['memory_fused']:>11.1f}{row['memory_fused'] / base['memory_fused']:>7.2f}"
                  f"{row['gmacs']:>9.2f}{row['gmacs'] / base['gmacs']:>7.2f}", flush=True)
            print_warnings(row["latency_timing"])

    if "lookupvit_tiny_patch16_224" in names:
        lookup_vs_vit(args.sizes)
    print("\nTargets:")
    if ("biformer_tiny", 224) in results:
        ratio = results["biformer_tiny", 224]["latency"] / results[BASELINE, 224]["latency"]
        print(f"  BiFormer-T latency at 224 = {ratio:.2f}x DeiT-Ti (target <= 3x): {'met' if ratio <= 3 else 'MISSED'}")
    if ("lookupvit_tiny_patch16_224", 224) in results:
        ratio = results["lookupvit_tiny_patch16_224", 224]["gmacs"] / results[BASELINE, 224]["gmacs"]
        verdict = "met" if ratio <= 0.55 else "MISSED"
        print(f"  LookupViT-Ti FLOPs at 224 = {ratio:.2f}x ViT-Ti (target <= 0.55x): {verdict}")


if __name__ == "__main__":
    main()

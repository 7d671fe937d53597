"""Training metrics: a tqdm bar, `metrics.jsonl` (one JSON object per logged step), optional TensorBoard,
and a loss-curve PNG at the end."""

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Logs on the main process only. A resumed run (`start_step > 0`) drops the rows after `start_step`
    that the interrupted run wrote, so the file describes one consistent run."""

    def __init__(self, out_dir, config, is_main: bool, start_step: int = 0):
        self.enabled = is_main
        self.log_every = config.logging.log_every
        self.path = Path(out_dir) / METRICS_FILE
        self.bar = self.writer = None
        self.throughput = {"samples": 0, "tokens": 0, "seconds": 0.0}
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if config.logging.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if config.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def log(self, step: int, loss: float, lr: float, samples: int, tokens: int, seconds: float, **extra):
        """Record one optimizer step; rows are written every `log_every` steps (throughput averaged over them)."""
        if not self.enabled:
            return
        for key, value in (("samples", samples), ("tokens", tokens), ("seconds", seconds)):
            self.throughput[key] += value
        if self.bar is not None:
            self.bar.update(1)
        if step % self.log_every:
            return
        elapsed = max(self.throughput["seconds"], 1e-9)
        row = {"step": step, "loss": loss, "lr": lr,
               "samples_per_s": self.throughput["samples"] / elapsed,
               "tokens_per_s": self.throughput["tokens"] / elapsed, **extra}
        self.throughput = {"samples": 0, "tokens": 0, "seconds": 0.0}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
        if self.writer is not None:
            for key in ("loss", "lr", "samples_per_s", "tokens_per_s"):
                self.writer.add_scalar(f"train/{key}", row[key], step)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path, png_path) -> Path:
    """Plot training loss against step from a `metrics.jsonl` file."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    rows = read_metrics(metrics_path)
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    axis.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if len(rows) < 50 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (mean over answer tokens)")
    axis.set_title(Path(metrics_path).parent.name)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    return Path(png_path)

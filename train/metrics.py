"""Training metrics: a tqdm bar on a terminal or progress lines in `train.log`, `metrics.jsonl` (one JSON
object per logged step), optional TensorBoard, and a loss-curve PNG at the end."""

import json
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressLines:
    """Progress for logs: a line every `every_s` seconds (and at the last step) with step, loss, rate and ETA,
    on stderr and appended to `log_path`. A tqdm bar redraws itself hundreds of times: off a terminal each
    redraw is one more line of the log."""

    def __init__(self, log_path: Path, total: int, start_step: int, every_s: float):
        self.log_path, self.total, self.every_s = log_path, total, every_s
        self.start_step, self.started = start_step, time.perf_counter()
        self.last_line = self.started

    def update(self, step: int, loss: float):
        now = time.perf_counter()
        if now - self.last_line < self.every_s and step < self.total:
            return
        self.last_line = now
        rate = (step - self.start_step) / max(now - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        self.write(f"step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  "
                   f"ETA {format_duration(eta) if eta != float('inf') else '?'}")

    def write(self, line: str):
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}"
        print(stamped, file=sys.stderr, flush=True)
        with open(self.log_path, "a") as handle:
            handle.write(stamped + "\n")


class MetricsLogger:
    """Logs on the main process only. A resumed run (`start_step > 0`) drops the rows after `start_step`
    that the interrupted run wrote, so the file describes one consistent run."""

    def __init__(self, out_dir, config, is_main: bool, start_step: int = 0):
        self.enabled = is_main
        self.log_every = config.logging.log_every
        self.path = Path(out_dir) / METRICS_FILE
        self.bar = self.writer = self.lines = None
        self.throughput = {"samples": 0, "tokens": 0, "seconds": 0.0}
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if config.logging.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
        else:
            self.lines = ProgressLines(self.path.parent / LOG_FILE, config.max_steps, start_step,
                                       config.logging.progress_every_s)
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
        if self.lines is not None:
            self.lines.update(step, loss)
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

    def message(self, line: str):
        """A line for the user (resumed, interrupted): above the bar on a terminal, else in the log too."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            self.lines.write(line)

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

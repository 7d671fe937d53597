"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay to `min_lr_ratio`."""

import math
from functools import partial

from torch.optim.lr_scheduler import LambdaLR

from .config import ScheduleSpec


def lr_factor(step: int, spec: ScheduleSpec, max_steps: int) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based)."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.name == "constant":
        return 1.0
    decay_steps = max(1, max_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / decay_steps)
    shape = 1.0 - progress if spec.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * shape


def build_scheduler(optimizer, spec: ScheduleSpec, max_steps: int) -> LambdaLR:
    """A `LambdaLR` (its state dict is plain numbers, so it is saved as JSON)."""
    return LambdaLR(optimizer, partial(lr_factor, spec=spec, max_steps=max_steps))

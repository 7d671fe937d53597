"""What LookupViT, BiFormer, Vim and ViG share: timm classifier plumbing, weight init, checkpoint unwrapping."""

import torch
from torch import nn


class ClassifierHeadMixin:
    """A Linear head on the pooled `num_features`, with timm's `get_classifier` / `reset_classifier` and the
    `grad_checkpointing` switch. `global_pools` lists the pooling modes a family supports."""

    global_pools = ("avg", "")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in self.global_pools:
                raise ValueError(f"{type(self).__name__}: global_pool must be one of {self.global_pools}, "
                                 f"got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def init_linear_weights(module: nn.Module) -> None:
    """timm's ViT init for Linear layers (apply with `model.apply`)."""
    if isinstance(module, nn.Linear):
        # trunc_normal_(std=.02) with its default +-2 bounds never truncates: a plain normal is the same, faster.
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def unwrap_state_dict(checkpoint: dict) -> dict:
    """The model weights of an official checkpoint: unwrap `{"model" | "state_dict" | "model_ema": ...}` and drop
    a DDP `module.` prefix."""
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}

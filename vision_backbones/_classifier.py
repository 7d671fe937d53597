"""The timm classifier plumbing that LookupViT, BiFormer, Vim and ViG share."""

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

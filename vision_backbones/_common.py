"""What LookupViT, BiFormer, Vim and ViG share: timm classifier plumbing, weight init, official checkpoints."""

import argparse
import pickle
from typing import Callable

import torch
from safetensors.torch import load_file
from timm.models import build_model_with_cfg, load_pretrained
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


# Where each set of weights sits in a training checkpoint: the raw model (what the official evaluation scripts
# load) or its exponential moving average.
WEIGHTS_KEYS = {"model": ("model", "state_dict"), "model_ema": ("model_ema", "state_dict_ema")}


def chosen_weights(model: nn.Module) -> str:
    """"model_ema" when the model's pretrained tag ends in "ema" (`vim_tiny_patch16_224.in1k_ema`, or
    `pretrained_cfg_overlay=dict(file=..., tag="ema")`), else "model"."""
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag") or ""
    return "model_ema" if tag.endswith("ema") else "model"


def unwrap_state_dict(checkpoint: dict, weights: str = "model") -> dict:
    """The `weights` ("model" or "model_ema") of an official checkpoint, without a DDP `module.` prefix.

    A training checkpoint wraps them (`{"model": ..., "model_ema": ..., "optimizer": ..., "args": ...}`); a plain
    state dict is returned as it is when "model" is asked for."""
    wrapped = [key for keys in WEIGHTS_KEYS.values() for key in keys if isinstance(checkpoint.get(key), dict)]
    if wrapped:
        found = [key for key in WEIGHTS_KEYS[weights] if key in wrapped]
        if not found:
            hint = "drop the 'ema' pretrained tag" if weights == "model_ema" else "pick them with an 'ema' tag"
            raise ValueError(f"the checkpoint holds {' and '.join(wrapped)} but no {weights} weights: {hint}")
        checkpoint = checkpoint[found[0]]
    elif weights == "model_ema":
        raise ValueError("the checkpoint is a plain state dict without model_ema weights: drop the 'ema' "
                         "pretrained tag")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def read_checkpoint(path: str) -> dict:
    """An official `.pth` read without running code from it (`weights_only=True`; the training `argparse.Namespace`
    that official files carry is allow-listed), or a `.safetensors` file."""
    if str(path).endswith(".safetensors"):
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"{path}: refusing to unpickle objects other than tensors and argparse.Namespace ({error}). If you "
            "trust the file, convert it once with `sd = torch.load(path, weights_only=False)['model']; "
            "torch.save(sd, 'weights.pth')` and load the converted file.") from error


def load_official_weights(model: nn.Module, path: str, filter_fn: Callable[[dict, nn.Module], dict]) -> None:
    """Our families' `load_pretrained`: timm calls it for every source of their weights (a file, a URL, the Hub;
    `build_backbone` sets `custom_load`), because timm's own file reader unwraps a checkpoint itself and prefers
    `model_ema`, before the family filter runs. Here the file is read safely, and timm's loader then runs
    on the state dict as usual (the filter picks the weights by `chosen_weights`, classifier and input channels
    are adapted, loading is strict)."""
    cfg = dict(model.pretrained_cfg, state_dict=read_checkpoint(path), file=None, url=None, source=None,
               custom_load=False)
    first_conv = model.get_submodule(cfg["first_conv"])
    load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=first_conv.in_channels, filter_fn=filter_fn)


def build_backbone(model_cls: type, variant: str, pretrained: bool, filter_fn: Callable[[dict, nn.Module], dict],
                   default_out_indices, **kwargs) -> nn.Module:
    """timm's `build_model_with_cfg` for our families, with every source of official weights read by
    `model_cls.load_pretrained`. timm turns `custom_load` off when `pretrained_cfg_overlay` names a source (a
    `file`, a `url`): its generic reader would then pick `model_ema` over `model` itself and refuse the pickled
    training arguments of official files. Setting `custom_load=False` in the overlay still chooses timm's reader."""
    pretrained_cfg_overlay = {"custom_load": "hf", **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    out_indices = kwargs.pop("out_indices", default_out_indices)
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                pretrained_cfg_overlay=pretrained_cfg_overlay,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)

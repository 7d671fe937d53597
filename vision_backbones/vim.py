"""Vim (Vision Mamba, ICML 2024, hustvl/Vim) as timm models: bidirectional Mamba blocks over patch tokens.

Structure, following the official ``vim/models_mamba.py`` with ``bimamba_type="v2"``:
- patch embedding (16x16 conv), a class token inserted in the *middle* of the patch sequence (index M//2), learned
  absolute position embeddings added after the insertion;
- 24 "Add -> RMSNorm -> Mixer" blocks carrying an fp32 residual stream;
- the mixer runs a Mamba-1 branch on the sequence and a second one, with its own conv/projection/SSM parameters,
  on the reversed sequence, averages the two and applies the shared output projection;
- a final add + RMSNorm; the middle token feeds the classifier.

State-dict keys match the official checkpoints (``layers.<i>.mixer.{in_proj,conv1d,conv1d_b,x_proj,x_proj_b,
dt_proj,dt_proj_b,A_log,A_b_log,D,D_b,out_proj}``, ``norm_f``...), so official ``.pth`` files load through
:func:`checkpoint_filter_fn`, for example with
``timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=path))``; that loads
the file's ``model`` weights, as the official evaluation does, and the ``.in1k_ema`` tags its ``model_ema``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    RmsNorm,
    lecun_normal_,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from ._common import ClassifierHeadMixin, build_backbone, chosen_weights, load_official_weights, unwrap_state_dict
from .ops.causal_conv1d import causal_conv1d
from .ops.selective_scan import selective_scan

__all__ = ["Vim", "BiMambaMixer", "VimBlock", "checkpoint_filter_fn"]


class VimPatchEmbed(nn.Module):
    """Conv patch embedding; ``stride`` below ``patch_size`` gives overlapping patches (the "+" fine-tunes use 8)."""

    def __init__(self, patch_size: int = 16, stride: Optional[int] = None, in_chans: int = 3, embed_dim: int = 192):
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride or patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=self.stride)

    def grid_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return tuple((s - self.patch_size) // self.stride + 1 for s in img_size)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba-1 mixer ("bimamba v2"): two scans with separate parameters, averaged.

    ``in_proj`` and ``out_proj`` are shared; the backward branch sees the reversed sequence (both the SSM input x
    and the gate z reversed) and owns ``conv1d_b``, ``x_proj_b``, ``dt_proj_b``, ``A_b_log`` and ``D_b``. Both
    directions run as one call: the reversed copy is stacked on the channel axis and the scan's grouped B/C give each
    half its own input-dependent B and C.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, scan_backend: str = "auto"):
        super().__init__()
        self.d_inner = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        for suffix in ("", "_b"):
            self.add_module("conv1d" + suffix, nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner))
            self.add_module("x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            self.add_module("dt_proj" + suffix, nn.Linear(self.dt_rank, self.d_inner, bias=True))
            self.register_parameter("A" + suffix + "_log", nn.Parameter(torch.empty(self.d_inner, d_state)))
            self.register_parameter("D" + suffix, nn.Parameter(torch.empty(self.d_inner)))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A, unit D, dt bias = softplus^-1 of log-uniform steps in
        [dt_min, dt_max]."""
        dt_min, dt_max, dt_floor = self._dt_range
        if self.A_log.is_meta:
            return
        for suffix in ("", "_b"):
            dt_proj = getattr(self, "dt_proj" + suffix)
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            getattr(self, "A" + suffix + "_log").copy_(
                torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
            getattr(self, "D" + suffix).fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, length, dim) -> (batch, length, dim)."""
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        batch, length, _ = x.shape
        # in_proj computed channel-major, (batch, 2E, L) with channels [x | z], straight out of the matmul.
        xz = torch.matmul(self.in_proj.weight, x.transpose(1, 2))
        u, z = xz[:, :E], xz[:, E:]
        # Forward direction in channels [0, E), the reversed sequence in [E, 2E).
        u = torch.cat([u, u.flip(-1)], dim=1)
        z = torch.cat([z, z.flip(-1)], dim=1)
        u = causal_conv1d(u, torch.cat([self.conv1d.weight, self.conv1d_b.weight]),
                          torch.cat([self.conv1d.bias, self.conv1d_b.bias]), activation="silu")
        # Per-direction projections as one batched matmul over the two channel halves: (batch, 2, R + 2N, L).
        x_dbl = torch.stack([self.x_proj.weight, self.x_proj_b.weight]) @ u.view(batch, 2, E, length)
        delta = torch.stack([self.dt_proj.weight, self.dt_proj_b.weight]) @ x_dbl[:, :, :R]  # (batch, 2, E, L)
        delta = delta.view(batch, 2 * E, length)
        y = selective_scan(
            u, delta,
            A=-torch.exp(torch.cat([self.A_log, self.A_b_log]).float()),
            B=x_dbl[:, :, R:R + N], C=x_dbl[:, :, R + N:],
            D=torch.cat([self.D, self.D_b]).float(), z=z,
            delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias]).float(), delta_softplus=True,
            backend=self.scan_backend)
        # Average the directions; the 1/2 is folded into the (small) output weight instead of the activations.
        y = y[:, :E] + y[:, E:].flip(-1)
        return F.linear(y.transpose(1, 2), self.out_proj.weight * 0.5, self.out_proj.bias)


class VimBlock(nn.Module):
    """Add -> RMSNorm -> BiMamba. Returns the mixer output and the (fp32) residual stream separately."""

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.norm = RmsNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor] = None):
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)))
        return hidden, residual


class Vim(ClassifierHeadMixin, nn.Module):
    """Vision Mamba with a middle class token (see the module docstring).

    ``forward_features`` returns the normalised tokens (batch, 1 + M, dim), class token first; ``global_pool`` is
    ``"token"`` (the class token, as the official models), ``"avg"`` (mean of the patch tokens) or ``""`` (no
    pooling). Any input size works: position embeddings are resampled around the middle token.
    """

    global_pools = ("token", "avg", "")

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            stride: Optional[int] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "token",
            embed_dim: int = 192,
            depth: int = 24,
            d_state: int = 16,
            expand: int = 2,
            d_conv: int = 4,
            norm_eps: float = 1e-5,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            scan_backend: str = "auto",
    ):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"Vim: global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.patch_embed = VimPatchEmbed(patch_size, stride, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size(img_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # Official rates: block i drops its incoming branch with rate linspace(0, rate, depth)[i - 1], and the final
        # add uses the full rate.
        rates = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([
            VimBlock(embed_dim, drop_path=rates[i], norm_eps=norm_eps, d_state=d_state, expand=expand,
                     d_conv=d_conv, scan_backend=scan_backend)
            for i in range(depth)])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm_f = RmsNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = self.patch_embed.stride
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.init_weights()

    def init_weights(self) -> None:
        """Official initialisation (mixers initialise themselves; out_proj rescaled by depth)."""
        if self.pos_embed.is_meta:
            return
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            out_proj = layer.mixer.out_proj
            nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                out_proj.weight /= math.sqrt(len(self.layers))

    # ----- timm model API -----
    @torch.jit.ignore
    def no_weight_decay(self):
        ssm_params = {n for n, _ in self.named_parameters() if n.endswith(("A_log", "A_b_log", ".D", ".D_b"))}
        return {"pos_embed", "cls_token"} | ssm_params

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    # ----- forward -----
    def _pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a patch grid, resampled around the middle class token when the grid changes."""
        if tuple(grid) == tuple(self.grid_size):
            return self.pos_embed
        return resample_middle_token_pos_embed(self.pos_embed, grid, self.grid_size)

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, grid = self.patch_embed(x)
        middle = x.shape[1] // 2
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :middle], cls, x[:, middle:]], dim=1)
        return self.pos_drop(x + self._pos_embed_for(grid)), grid

    def _run_layer(self, layer: VimBlock, hidden, residual):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(layer, hidden, residual)
        return layer(hidden, residual)

    def _final_tokens(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Final add + norm, with the class token moved from the middle of the sequence to the front."""
        tokens = self.norm_f((residual + self.drop_path(hidden).float()).to(self.norm_f.weight.dtype))
        middle = (tokens.shape[1] - 1) // 2
        return torch.cat([tokens[:, middle:middle + 1], tokens[:, :middle], tokens[:, middle + 1:]], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (batch, 3, H, W) -> normalised tokens (batch, 1 + M, dim): the class token first (it is processed
        in the middle of the sequence, as officially, and moved to the front so that ``num_prefix_tokens`` means what
        it means for timm's ViT), then the M patch tokens in raster order."""
        hidden, _ = self._embed(x)
        residual = None
        for layer in self.layers:
            hidden, residual = self._run_layer(layer, hidden, residual)
        return self._final_tokens(hidden, residual)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, 1:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """Per-block token maps, as timm's ViT: the stream after block i (residual + mixer output).

        Returns a list of (batch, dim, gh, gw) maps (``output_fmt="NCHW"``) or (batch, gh*gw, dim) (``"NLC"``),
        without the class token unless ``return_prefix_tokens`` (then (map, class_token) pairs); with
        ``intermediates_only=False`` also the final normalised tokens, as ``(final, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"Vim.forward_intermediates: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        hidden, grid = self._embed(x)
        layers = self.layers[:max_index + 1] if stop_early else self.layers
        residual = None
        intermediates = []
        for i, layer in enumerate(layers):
            hidden, residual = self._run_layer(layer, hidden, residual)
            if i in take_indices:
                stream = (residual + hidden.float()).to(hidden.dtype)
                intermediates.append(self.norm_f(stream) if norm else stream)
        middle = (intermediates[0].shape[1] - 1) // 2 if intermediates else 0
        prefix = [y[:, middle:middle + 1] for y in intermediates]
        intermediates = [torch.cat([y[:, :middle], y[:, middle + 1:]], dim=1) for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        if stop_early and len(layers) < len(self.layers):
            raise ValueError("Vim.forward_intermediates: stop_early needs intermediates_only=True")
        return self._final_tokens(hidden, residual), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the layers after the last wanted intermediate (and optionally the final norm and the head)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's hook for an official file from any source (`custom_load` in the pretrained configs): read it
        without unpickling code, then load it as timm does, through `checkpoint_filter_fn`."""
        load_official_weights(self, checkpoint_path, checkpoint_filter_fn)


def resample_middle_token_pos_embed(pos_embed: torch.Tensor, new_grid: Tuple[int, int],
                                    old_grid: Tuple[int, int]) -> torch.Tensor:
    """Resample (1, M + 1, C) position embeddings whose class-token entry sits at index M // 2.

    The class entry is taken out, the patch grid resized (bicubic, no antialiasing, as Vim's resize code), and the
    class entry put back at the new middle index.
    """
    middle = (pos_embed.shape[1] - 1) // 2
    cls = pos_embed[:, middle:middle + 1]
    patches = torch.cat([pos_embed[:, :middle], pos_embed[:, middle + 1:]], dim=1)
    patches = resample_abs_pos_embed(patches, list(new_grid), list(old_grid), num_prefix_tokens=0,
                                     interpolation="bicubic", antialias=False)
    new_middle = patches.shape[1] // 2
    return torch.cat([patches[:, :new_middle], cls, patches[:, new_middle:]], dim=1)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: Vim) -> Dict[str, torch.Tensor]:
    """Adapt an official Vim state dict: unwrap ``model``, resample ``pos_embed`` around the middle class token,
    and drop the classifier when the model has none. Keys are otherwise identical."""
    out = {}
    for key, value in unwrap_state_dict(state_dict, chosen_weights(model)).items():
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            old_tokens = value.shape[1] - 1
            side = int(math.isqrt(old_tokens))
            if side * side != old_tokens:
                raise ValueError(f"Vim checkpoint: pos_embed {tuple(value.shape)} is not a square grid plus one token")
            value = resample_middle_token_pos_embed(value, model.grid_size, (side, side))
        if key.startswith("head.") and not isinstance(model.head, nn.Linear):
            continue
        out[key] = value
    return out


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> Vim:
    return build_backbone(Vim, variant, pretrained, checkpoint_filter_fn, default_out_indices=3, **kwargs)


def _cfg(**kwargs):
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


_official_files = {
    "vim_tiny_patch16_224.in1k": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_small_patch16_224.in1k": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    # "+" fine-tunes: overlapping patches (stride 8, 27x27 grid at 224).
    "vim_tiny_patch16_stride8_224.in1k_ft": ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_stride8_224.in1k_ft": ("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth"),
}
# Vim's training script saves `model` and `model_ema` in every checkpoint: the plain tag loads `model` (what the
# official evaluation loads), the `_ema` twin the moving average.
default_cfgs = generate_default_cfgs({
    **{name: _cfg(hf_hub_id=hub_id, hf_hub_filename=filename) for name, (hub_id, filename) in _official_files.items()},
    **{f"{name}_ema": _cfg(hf_hub_id=hub_id, hf_hub_filename=filename)
       for name, (hub_id, filename) in _official_files.items()},
    # The base checkpoint's file name in hustvl/Vim-base-midclstok is not recorded here: load it with
    # pretrained_cfg_overlay=dict(file=...).
    "vim_base_patch16_224.in1k": _cfg(),
    "test_vim": _cfg(input_size=(3, 64, 64)),
})


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> Vim:
    """Vim-Ti: dim 192, 24 layers, d_state 16 (7.15M parameters)."""
    return _create_vim("vim_tiny_patch16_224", pretrained, **dict(dict(embed_dim=192, depth=24), **kwargs))


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> Vim:
    """Vim-S: dim 384, 24 layers (25.8M parameters)."""
    return _create_vim("vim_small_patch16_224", pretrained, **dict(dict(embed_dim=384, depth=24), **kwargs))


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> Vim:
    """Vim-B: dim 768, 24 layers (97.6M parameters)."""
    return _create_vim("vim_base_patch16_224", pretrained, **dict(dict(embed_dim=768, depth=24), **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> Vim:
    """Vim-Ti+ (the fine-tuned 78.3% model): Vim-Ti with 16x16 patches at stride 8 (729 patches at 224)."""
    args = dict(embed_dim=192, depth=24, stride=8)
    return _create_vim("vim_tiny_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> Vim:
    """Vim-S+ (the fine-tuned 81.6% model): Vim-S with 16x16 patches at stride 8."""
    args = dict(embed_dim=384, depth=24, stride=8)
    return _create_vim("vim_small_patch16_stride8_224", pretrained, **dict(args, **kwargs))


@register_model
def test_vim(pretrained: bool = False, **kwargs) -> Vim:
    """A tiny Vim for tests and the demo: 64 px, 16-px patches (a 4x4 grid), 4 layers of width 96."""
    args = dict(img_size=64, patch_size=16, depth=4, embed_dim=96)
    return _create_vim("test_vim", pretrained, **dict(args, **kwargs))

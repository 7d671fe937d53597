"""ViG (hustvl/ViG, arXiv 2405.18425) as timm models: bidirectional gated linear attention over patch tokens.

Structure, following the official ``classification/models/vig.py`` (plain, non-hierarchical ViG):
- "v2" patch stem: conv 9x9 stride 8 -> LayerNorm2d -> SiLU -> conv 3x3 stride 2 -> LayerNorm2d (14x14 at 224);
- learned absolute position embeddings (no class token), bicubically resized for other input sizes;
- 12 blocks ``x + GLA(RMSNorm(x))`` then ``+ SwiGLU(RMSNorm(.))``;
- final RMSNorm, average pooling, linear head.

The GLA layer injects 2-D locality twice: its q/k/v/gates read a depthwise 3x3 convolution of the input, and its
output is mixed with that local branch by a learned sigmoid gate. Forward and backward scans have their own forget
gates (a rank-16 projection split in two, ``logsigmoid / 16``).

State-dict keys match the official checkpoints (``blocks.<i>.attn.{in_proj.0,qkv_proj,gk_proj.0,gk_proj.1,g_proj,
g_norm,l_norm,o_proj}``, ``blocks.<i>.mlp.{gate_proj,down_proj}``, ``patch_embed.proj.{0,1,3,4}``...), so
official ``.pth`` files load with
``timm.create_model("vig_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=path))``; add
``gla_output_scale=0.5`` to compute as the official evaluation does (its fused kernel halves the scan output once
more than the training path, which the following RMSNorm sees through its eps).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    LayerNorm2d,
    RmsNorm,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from ._common import ClassifierHeadMixin, build_backbone, chosen_weights, load_official_weights, unwrap_state_dict
from .ops.elementwise import log_sigmoid
from .ops.gla import bidirectional_gated_linear_attention

__all__ = ["ViG", "ViGAttention", "ViGBlock", "checkpoint_filter_fn"]


class ViGPatchEmbed(nn.Module):
    """ViG's "v2" stem: overlapping conv (kernel p/2+1, stride p/2) then a 3x3 stride-2 conv, LayerNorm2d after each."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 192, act_last: bool = False):
        super().__init__()
        stride = patch_size // 2
        layers = [
            nn.Conv2d(in_chans, embed_dim // 2, kernel_size=stride + 1, stride=stride, padding=1),
            LayerNorm2d(embed_dim // 2, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(embed_dim // 2, embed_dim, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(embed_dim, eps=1e-5),
        ]
        if act_last:
            layers.append(nn.SiLU())
        self.proj = nn.Sequential(*layers)
        self.patch_size = patch_size

    def grid_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        stride = self.patch_size // 2
        first = [(s + 2 - (stride + 1)) // stride + 1 for s in img_size]
        return tuple((s + 2 - 3) // 2 + 1 for s in first)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class ViGAttention(nn.Module):
    """Bidirectional gated linear attention with 2-D locality (official ``GatedLinearAttention``).

    ``gla_output_scale`` multiplies the averaged scan output before ``g_norm``. The official training path averages
    the two directions (1.0); its inference path averages them in the fused kernel and halves once more (0.5). The
    RMSNorm cancels the factor up to its eps (``o / sqrt(mean(o**2) + 4 eps)`` instead of ``+ eps``): 0.5 reproduces
    the official evaluation of official weights exactly, 1.0 is the training computation."""

    def __init__(self, dim: int, num_heads: int, expand_k: float = 0.5, gate_low_rank_dim: int = 16,
                 gate_logit_normalizer: float = 16.0, act_in_conv: bool = True, out_act: bool = False,
                 norm_eps: float = 1e-6, gla_output_scale: float = 1.0):
        super().__init__()
        self.gla_output_scale = gla_output_scale
        self.num_heads = num_heads
        self.key_dim = int(dim * expand_k)
        self.value_dim = dim  # expand_v = 1: the local branch (dim channels) is mixed per head with the output
        if self.key_dim % num_heads or dim % num_heads:
            raise ValueError(f"ViGAttention: dim {dim} and key dim {self.key_dim} must divide by heads {num_heads}")
        self.head_v_dim = dim // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.in_proj = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False),
            nn.SiLU() if act_in_conv else nn.Identity())
        self.qkv_proj = nn.Linear(dim, 2 * self.key_dim + self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(dim, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, 2 * self.key_dim, bias=True))
        self.g_proj = nn.Linear(dim, self.value_dim, bias=True)
        self.g_norm = RmsNorm(self.head_v_dim, eps=norm_eps)
        self.l_norm = RmsNorm(self.head_v_dim, eps=norm_eps)
        self.out_act = nn.SiLU() if out_act else nn.Identity()
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)

    def reset_parameters(self) -> None:
        """Official initialisation: Xavier-uniform with gain 2**-2.5 on every projection."""
        for weight in (self.qkv_proj.weight, self.in_proj[0].weight, self.g_proj.weight, self.o_proj.weight,
                       self.gk_proj[0].weight, self.gk_proj[1].weight):
            nn.init.xavier_uniform_(weight, gain=2 ** -2.5)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """x: (batch, H*W, dim) tokens of a (H, W) grid -> (batch, H*W, dim)."""
        batch, length, dim = x.shape
        heads = self.num_heads
        local = self.in_proj(x.transpose(1, 2).reshape(batch, dim, *grid)).flatten(2).transpose(1, 2)
        q, k, v = self.qkv_proj(local).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        gates = log_sigmoid(self.gk_proj(local)) / self.gate_logit_normalizer
        g_forward, g_backward = gates.chunk(2, dim=-1)

        def to_heads(t):
            return t.reshape(batch, length, heads, -1).transpose(1, 2)

        o = bidirectional_gated_linear_attention(to_heads(q), to_heads(k), to_heads(v), to_heads(g_forward),
                                                 to_heads(g_backward))
        o = self.g_norm(o.transpose(1, 2) * self.gla_output_scale)  # (batch, L, heads, head_v_dim)
        gate = torch.sigmoid(self.g_proj(local)).view(batch, length, heads, self.head_v_dim)
        local = self.l_norm(local.view(batch, length, heads, self.head_v_dim))
        o = torch.lerp(local, o, gate)  # o * gate + local * (1 - gate)
        return self.o_proj(self.out_act(o.reshape(batch, length, self.value_dim)))


class SwiGLU(nn.Module):
    """``down(silu(gate) * value)`` with gate and value from one projection; hidden = 8/3 dim rounded up to 256."""

    def __init__(self, dim: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or 256 * math.ceil(int(dim * 4 * 2 / 3) / 256)
        self.gate_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.gate_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * value)


class ViGBlock(nn.Module):
    """``x + GLA(RMSNorm(x))`` then ``+ SwiGLU(RMSNorm(.))``, each branch with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0, norm_eps: float = 1e-6, **attn_kwargs):
        super().__init__()
        self.attn_norm = RmsNorm(dim, eps=norm_eps)
        self.attn = ViGAttention(dim, num_heads, norm_eps=norm_eps, **attn_kwargs)
        self.mlp_norm = RmsNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.attn_norm(x), grid))
        return x + self.drop_path(self.mlp(self.mlp_norm(x)))


class ViG(ClassifierHeadMixin, nn.Module):
    """Plain (isotropic) ViG. ``forward_features`` returns normalised patch tokens (batch, H*W, dim); the head
    averages them (``global_pool="avg"``, or ``""`` for no pooling). ``gla_output_scale=0.5`` gives the official
    inference computation (see :class:`ViGAttention`)."""

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            expand_k: float = 0.5,
            act_in_conv: bool = True,
            out_act: bool = False,
            act_in_patch: bool = False,
            norm_eps: float = 1e-6,
            gla_output_scale: float = 1.0,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"ViG: global_pool must be 'avg' or '', got {global_pool!r}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False

        self.patch_embed = ViGPatchEmbed(patch_size, in_chans, embed_dim, act_last=act_in_patch)
        self.grid_size = self.patch_embed.grid_size(img_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            ViGBlock(embed_dim, num_heads, drop_path=rates[i], norm_eps=norm_eps, expand_k=expand_k,
                     act_in_conv=act_in_conv, out_act=out_act, gla_output_scale=gla_output_scale)
            for i in range(depth)])
        self.norm = RmsNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        self.init_weights()

    def init_weights(self) -> None:
        """Official initialisation: linear layers N(0, 0.02) with zero bias, GLA projections Xavier (gain 2**-2.5)."""
        if self.pos_embed.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            block.attn.reset_parameters()
        trunc_normal_(self.pos_embed, std=0.02)

    # ----- timm model API -----
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    # ----- forward -----
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, grid = self.patch_embed(x)
        pos_embed = self.pos_embed
        if tuple(grid) != tuple(self.grid_size):
            # Bicubic without antialiasing, as the official resize_pos_embed.
            pos_embed = resample_abs_pos_embed(pos_embed, list(grid), list(self.grid_size), num_prefix_tokens=0,
                                               interpolation="bicubic", antialias=False)
        return self.pos_drop(x + pos_embed), grid

    def _run_block(self, block: ViGBlock, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x, grid)
        return block(x, grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (batch, 3, H, W) -> normalised patch tokens (batch, H/16 * W/16, dim)."""
        x, grid = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x, grid)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """Per-block token maps as (batch, dim, gh, gw) (``"NCHW"``) or (batch, gh*gw, dim) (``"NLC"``); with
        ``intermediates_only=False`` returns ``(final normalised tokens, intermediates)``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"ViG.forward_intermediates: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x, grid)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if intermediates_only:
            return intermediates
        if stop_early and len(blocks) < len(self.blocks):
            raise ValueError("ViG.forward_intermediates: stop_early needs intermediates_only=True")
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last wanted intermediate (and optionally the final norm and the head)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's hook for an official file from any source (`custom_load` in the pretrained configs): read it
        without unpickling code, then load it as timm does, through `checkpoint_filter_fn`."""
        load_official_weights(self, checkpoint_path, checkpoint_filter_fn)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ViG) -> Dict[str, torch.Tensor]:
    """Adapt an official ViG state dict: unwrap ``model`` if present (the official loader accepts both layouts),
    resize ``pos_embed`` to the model's grid, drop the classifier when the model has none."""
    out = {}
    for key, value in unwrap_state_dict(state_dict, chosen_weights(model)).items():
        if key == "pos_embed" and value.shape != model.pos_embed.shape:
            side = int(math.isqrt(value.shape[1]))
            if side * side != value.shape[1]:
                raise ValueError(f"ViG checkpoint: pos_embed {tuple(value.shape)} is not a square grid")
            value = resample_abs_pos_embed(value, list(model.grid_size), [side, side], num_prefix_tokens=0,
                                           interpolation="bicubic", antialias=False)
        if key.startswith("head.") and not isinstance(model.head, nn.Linear):
            continue
        out[key] = value
    return out


def _create_vig(variant: str, pretrained: bool = False, **kwargs) -> ViG:
    return build_backbone(ViG, variant, pretrained, checkpoint_filter_fn, default_out_indices=3, **kwargs)


def _cfg(**kwargs):
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj.0", "classifier": "head", "license": "mit", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "vig_tiny_patch16_224.in1k": _cfg(hf_hub_id="hustvl/ViG", hf_hub_filename="vig_t_77p2acc.pth"),
    "vig_small_patch16_224.in1k": _cfg(hf_hub_id="hustvl/ViG", hf_hub_filename="vig_s_81p7acc.pth"),
    "vig_base_patch16_224.in1k": _cfg(hf_hub_id="hustvl/ViG", hf_hub_filename="vig_b_82p6acc.pth"),
    "test_vig": _cfg(input_size=(3, 64, 64)),
})


@register_model
def vig_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-T: dim 192, 12 blocks, 3 heads, SiLU after the local conv and on the output (5.83M parameters)."""
    args = dict(embed_dim=192, depth=12, num_heads=3, act_in_conv=True, out_act=True)
    return _create_vig("vig_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vig_small_patch16_224(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-S: dim 384, 12 blocks, 6 heads (22.6M parameters)."""
    args = dict(embed_dim=384, depth=12, num_heads=6, act_in_conv=False, out_act=False)
    return _create_vig("vig_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def vig_base_patch16_224(pretrained: bool = False, **kwargs) -> ViG:
    """ViG-B: dim 768, 12 blocks, 12 heads (89.0M parameters)."""
    args = dict(embed_dim=768, depth=12, num_heads=12, act_in_conv=False, out_act=False)
    return _create_vig("vig_base_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def test_vig(pretrained: bool = False, **kwargs) -> ViG:
    """A tiny ViG for tests and the demo: ViG-T's layout at 64 px (a 4x4 grid), 4 blocks of width 96."""
    args = dict(img_size=64, patch_size=16, depth=4, embed_dim=96, num_heads=3, act_in_conv=True, out_act=True)
    return _create_vig("test_vig", pretrained, **dict(args, **kwargs))

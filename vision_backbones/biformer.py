"""BiFormer (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023) as timm models.

Variants and module layout follow the official `rayleizhu/BiFormer:models/biformer.py` (MIT), so its ImageNet-1k
checkpoints (`{"model": state_dict}` files) load with no missing or unexpected keys:

| name           | depths        | dims               | params |
|----------------|---------------|--------------------|--------|
| biformer_tiny  | [2, 2, 8, 2]  | [64, 128, 256, 512] | 13.14M |
| biformer_small | [4, 4, 18, 4] | [64, 128, 256, 512] | 25.54M |
| biformer_base  | [4, 4, 18, 4] | [96, 192, 384, 768] | 56.80M |

Common settings: 7x7 regions, top-k [1, 4, 16, full attention], head width 32, MLP ratio 3, 3x3 depthwise conv
position embedding before attention, 5x5 LCE/LePE, BatchNorm in the stem, downsamplers and final norm.
Stage 4 uses plain attention with LePE and, as upstream, 8 heads and no qkv bias (topk=-2 in the official code).

Weights are not downloaded: load an official file with
`timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file="biformer_tiny_best.pth"))`.
"""

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, use_fused_attn
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ._common import (ClassifierHeadMixin, build_backbone, chosen_weights, init_linear_weights, load_official_weights,
                      unwrap_state_dict)
from .ops.routing_attention import BiLevelRoutingAttention, multi_head_attention


class AttentionLePE(nn.Module):
    """Full multi-head attention with a depthwise-conv positional term (LePE), used in the last stage.

    Upstream quirk kept for checkpoint compatibility: the LePE convolution runs on the attention *input*
    (not on v), and is added to the attention output before the projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, lepe_kernel_size: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, lepe_kernel_size, padding=lepe_kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = multi_head_attention(q, k, v, self.scale, self.fused_attn)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """Conv position embedding, then pre-norm attention and MLP residuals. NCHW in and out, NHWC inside."""

    def __init__(self, dim: int, num_heads: int, topk: int, mlp_ratio: float = 3.0, num_regions: int = 7,
                 lce_kernel_size: int = 5, pos_kernel_size: int = 3, last_stage_heads: int = 8,
                 drop_path: float = 0.0):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, pos_kernel_size, padding=pos_kernel_size // 2, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads=num_heads, num_regions=num_regions, topk=topk,
                                                lce_kernel_size=lce_kernel_size)
        else:  # upstream topk=-2: full attention over the whole (small) last-stage map
            self.attn = AttentionLePE(dim, num_heads=last_stage_heads, lepe_kernel_size=lce_kernel_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        # Linear, Identity, GELU, Linear: the Identity keeps the upstream keys `mlp.0` / `mlp.3`.
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


def _conv_bn(in_chs: int, out_chs: int) -> list[nn.Module]:
    return [nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1), nn.BatchNorm2d(out_chs)]


class BiFormer(ClassifierHeadMixin, nn.Module):
    """Four-stage BiFormer (stride 4, 8, 16, 32). `forward_features` returns the normed NCHW map of stage 4."""

    def __init__(
            self,
            depths: tuple[int, ...] = (2, 2, 8, 2),
            embed_dims: tuple[int, ...] = (64, 128, 256, 512),
            head_dim: int = 32,
            mlp_ratios: tuple[float, ...] = (3, 3, 3, 3),
            topks: tuple[int, ...] = (1, 4, 16, -2),
            num_regions: int = 7,
            lce_kernel_size: int = 5,
            pos_kernel_size: int = 3,
            last_stage_heads: int = 8,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not len(depths) == len(embed_dims) == len(mlp_ratios) == len(topks) == 4:
            raise ValueError("depths, embed_dims, mlp_ratios and topks need one entry per stage (4)")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool={global_pool!r}: BiFormer supports 'avg' or '' (no pooling)")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        stem = [nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1), nn.BatchNorm2d(embed_dims[0] // 2),
                nn.GELU(), *_conv_bn(embed_dims[0] // 2, embed_dims[0])]
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(*stem)] + [nn.Sequential(*_conv_bn(embed_dims[i], embed_dims[i + 1])) for i in range(3)])

        num_blocks = sum(depths)  # stochastic depth grows linearly from 0 to drop_path_rate
        drop_rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i, (depth, dim) in enumerate(zip(depths, embed_dims)):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                BiFormerBlock(dim, num_heads=dim // head_dim, topk=topks[i], mlp_ratio=mlp_ratios[i],
                              num_regions=num_regions, lce_kernel_size=lce_kernel_size,
                              pos_kernel_size=pos_kernel_size, last_stage_heads=last_stage_heads,
                              drop_path=drop_rates[first + j])
                for j in range(depth)]))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))

        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^downsample_layers\.0",
                    blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.(\d+)", None),
                                                              (r"^downsample_layers\.(\d+)", (0,)),
                                                              (r"^norm", (99999,))])

    def _run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample_layers[index](x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages[index], x)
        return self.stages[index](x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (NCHW) for the stages in `indices` (last n if int, all if None).

        `norm=True` applies the final BatchNorm to the last stage's output (it only fits that stage).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: BiFormer intermediates are NCHW maps")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        num_stages = max_index + 1 if stop_early else len(self.stages)
        intermediates = []
        for i in range(num_stages):
            x = self._run_stage(i, x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if num_stages - 1 == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and norm/head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        pruned_end = max_index < 3
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.stages)):
            x = self._run_stage(i, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's hook for an official file from any source (`custom_load` in the pretrained configs): read it
        without unpickling code, then load it as timm does, through `checkpoint_filter_fn`."""
        load_official_weights(self, checkpoint_path, checkpoint_filter_fn)


def checkpoint_filter_fn(state_dict: dict, model: BiFormer) -> dict:
    """Adapt an official BiFormer checkpoint: unwrap `{"model": ...}` / `{"state_dict": ...}`, drop a DDP
    `module.` prefix. The module layout is the official one, so keys are otherwise unchanged."""
    return unwrap_state_dict(state_dict, chosen_weights(model))


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_backbone(BiFormer, variant, pretrained, checkpoint_filter_fn, default_out_indices=(0, 1, 2, 3),
                          **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0", "classifier": "head", "license": "mit",
        "origin_url": "https://github.com/rayleizhu/BiFormer", "paper_ids": "arXiv:2303.08810",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(),
    "biformer_small.in1k": _cfg(),
    "biformer_base.in1k": _cfg(),
    "test_biformer": _cfg(input_size=(3, 64, 64)),
})


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: 13.1M parameters, 2.2 GMACs at 224."""
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: 25.5M parameters, 4.5 GMACs at 224."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained, **dict(args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: 56.8M parameters, 9.8 GMACs at 224."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained, **dict(args, **kwargs))


@register_model
def test_biformer(pretrained: bool = False, **kwargs) -> BiFormer:
    """A tiny BiFormer for tests and the demo: 5 blocks, widths 32-256, a 2x2 region grid (at 64 px its stride-16
    stage is a 4x4 grid)."""
    args = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), topks=(1, 2, 4, -2), num_regions=2)
    return _create_biformer("test_biformer", pretrained, **dict(args, **kwargs))

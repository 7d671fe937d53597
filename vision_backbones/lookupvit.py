"""LookupViT (Koner et al., "LookupViT: Compressing visual information to a limited number of tokens", ECCV 2024,
arXiv 2407.12753) as timm models.

There is no official code or checkpoint, so this module defines the configuration and key layout. Source of each
choice: the paper (arXiv 2407.12753) as summarised in the suite's reference notes; choices not taken from the
paper are marked "ours".

Token streams (per the paper):
- N *lookup* tokens: the usual 16x16 patch tokens plus a learned absolute position embedding.
- M *compressed* tokens: the lookup-token grid (with its position embedding) resized bilinearly to an
  m x m grid (ours: antialiased, so every lookup token contributes when shrinking).

Block (per the paper):
1. lookup -> compressed: compressed tokens query the lookup tokens (multi-head cross-attention, residual).
2. compressed tokens: an ordinary ViT block (MHSA + MLP ratio 4), the only quadratic/heavy part.
3. compressed -> lookup: lookup tokens receive compressed-token values through the transposed similarity
   of step 1, re-normalised by a softmax over the compressed axis (no new query/key projections).
4. lookup tokens: a narrow MLP (ours: hidden = dim / 2).
Output (ours): the final LayerNorm of the lookup tokens, (B, N, D); the classifier average-pools them. The last
block's compressed-stream result reaches the lookup tokens through step 3.

Multi-resolution compressed tokens (per the paper): the grid m is not a parameter, so one set of weights serves
several compute budgets. Choose it per call (`model(x, compressed_grid=3)`), per model
(`model.set_compressed_grid(7)`), or sample it per training batch (`train_grid_sizes=(3, 5, 7, 10)`).

Variants (widths/depths/heads of ViT-Ti/S/B, patch 16; default grid 5x5, ours, giving about 0.45x the FLOPs of
the ViT of the same width at 224):

| name                         | dim | depth | heads |
|------------------------------|-----|-------|-------|
| lookupvit_tiny_patch16_224   | 192 | 12    | 3     |
| lookupvit_small_patch16_224  | 384 | 12    | 6     |
| lookupvit_base_patch16_224   | 768 | 12    | 12    |
"""

from functools import partial

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block
from torch import nn

from ._common import (ClassifierHeadMixin, build_backbone, chosen_weights, init_linear_weights, load_official_weights,
                      unwrap_state_dict)

GridSize = int | tuple[int, int]


def _as_grid(grid: GridSize) -> tuple[int, int]:
    height, width = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if height < 1 or width < 1:
        raise ValueError(f"compressed grid {grid!r} must be positive")
    return height, width


class BidirectionalCrossAttention(nn.Module):
    """Multi-head bidirectional cross-attention between compressed and lookup tokens.

    `gather` lets the compressed tokens attend to the lookup tokens and returns the similarity logits;
    `scatter` reuses those logits, transposed and softmax-normalised over the compressed axis, to send
    compressed-token values back to the lookup tokens.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must divide by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)         # compressed queries
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)    # lookup keys and values
        self.proj = nn.Linear(dim, dim)                     # output to the compressed tokens
        self.v_back = nn.Linear(dim, dim, bias=qkv_bias)    # compressed values for the reverse direction
        self.proj_back = nn.Linear(dim, dim)                # output to the lookup tokens

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, heads, L, D/heads)
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:  # (B, heads, L, d) -> (B, L, heads*d)
        return x.transpose(1, 2).flatten(2)

    def gather(self, compressed: torch.Tensor, lookup: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lookup -> compressed. Returns the update for the compressed tokens and the logits (B, heads, M, N)."""
        q = self._heads(self.q(compressed))
        k, v = (self._heads(t) for t in self.kv(lookup).chunk(2, dim=-1))
        logits = (q * self.scale) @ k.transpose(-2, -1)
        return self.proj(self._merge(logits.softmax(dim=-1) @ v)), logits

    def scatter(self, compressed: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Compressed -> lookup through the reused logits. Returns the update for the lookup tokens."""
        attn = logits.softmax(dim=-2).transpose(-2, -1)  # (B, heads, N, M), normalised over compressed tokens
        v = self._heads(self.v_back(compressed))
        return self.proj_back(self._merge(attn @ v))


class LookupViTBlock(nn.Module):
    """One LookupViT block on (compressed, lookup) token pairs; see the module docstring for the four steps."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, lookup_mlp_ratio: float = 0.5,
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm_compressed = nn.LayerNorm(dim, eps=1e-6)
        self.norm_lookup = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = BidirectionalCrossAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.compressed_block = Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.norm_back = nn.LayerNorm(dim, eps=1e-6)
        self.norm_lookup_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.lookup_mlp = Mlp(dim, hidden_features=int(dim * lookup_mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, compressed: torch.Tensor, lookup: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        update, logits = self.cross_attn.gather(self.norm_compressed(compressed), self.norm_lookup(lookup))
        compressed = compressed + self.drop_path(update)
        compressed = self.compressed_block(compressed)
        lookup = lookup + self.drop_path(self.cross_attn.scatter(self.norm_back(compressed), logits))
        lookup = lookup + self.drop_path(self.lookup_mlp(self.norm_lookup_mlp(lookup)))
        return compressed, lookup


class LookupViT(ClassifierHeadMixin, nn.Module):
    """LookupViT image encoder. `forward_features` returns the normed lookup tokens (B, N, D)."""

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            mlp_ratio: float = 4.0,
            lookup_mlp_ratio: float = 0.5,
            compressed_grid: GridSize = 5,
            train_grid_sizes: tuple[GridSize, ...] | None = None,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool={global_pool!r}: LookupViT supports 'avg' or ''")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        self.compressed_grid = _as_grid(compressed_grid)
        self.train_grid_sizes = tuple(_as_grid(g) for g in train_grid_sizes) if train_grid_sizes else None

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False,
                                      dynamic_img_pad=True, output_fmt="NHWC")
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        drop_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            LookupViTBlock(embed_dim, num_heads, mlp_ratio=mlp_ratio, lookup_mlp_ratio=lookup_mlp_ratio,
                           qkv_bias=qkv_bias, drop_path=drop_rates[i])
            for i in range(depth)])
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.normal_(self.pos_embed, std=0.02)
        self.apply(init_linear_weights)

    def set_compressed_grid(self, grid: GridSize) -> None:
        """Set the default compressed-token grid (int m for m x m, or (h, w)) used when a call does not pass one."""
        self.compressed_grid = _as_grid(grid)

    def _grid_for_call(self, compressed_grid: GridSize | None) -> tuple[int, int]:
        if compressed_grid is not None:
            return _as_grid(compressed_grid)
        if self.training and self.train_grid_sizes:
            # Multi-resolution training: one grid per batch, drawn from the configured sizes.
            return self.train_grid_sizes[int(torch.randint(len(self.train_grid_sizes), ()))]
        return self.compressed_grid

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def _embed(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Image -> (compressed tokens (B, M, D), lookup tokens (B, N, D), lookup grid size)."""
        x = self.patch_embed(x)  # (B, H, W, D)
        height, width = x.shape[1:3]
        pos_embed = self.pos_embed
        if (height, width) != self.patch_embed.grid_size:
            pos_embed = resample_abs_pos_embed(pos_embed, new_size=(height, width),
                                               old_size=self.patch_embed.grid_size, num_prefix_tokens=0)
        lookup = x.flatten(1, 2) + pos_embed
        # Resizing the sum resizes tokens and position embeddings alike (the resize is linear).
        lookup_map = lookup.transpose(1, 2).reshape(x.shape[0], -1, height, width)
        compressed = F.interpolate(lookup_map, size=grid, mode="bilinear", align_corners=False, antialias=True)
        return compressed.flatten(2).transpose(1, 2), lookup, (height, width)

    def _run_block(self, block: LookupViTBlock, compressed: torch.Tensor, lookup: torch.Tensor):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, compressed, lookup)
        return block(compressed, lookup)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            compressed_grid: GridSize | None = None,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Lookup tokens after the blocks in `indices` (last n if int, all if None), as NCHW maps or NLC tokens."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        compressed, lookup, (height, width) = self._embed(x, self._grid_for_call(compressed_grid))
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            compressed, lookup = self._run_block(block, compressed, lookup)
            if i in take_indices:
                out = self.norm(lookup) if norm else lookup
                if output_fmt == "NCHW":
                    out = out.transpose(1, 2).reshape(out.shape[0], -1, height, width)
                intermediates.append(out)
        if intermediates_only:
            return intermediates
        return self.norm(lookup), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks (and norm/head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor, compressed_grid: GridSize | None = None) -> torch.Tensor:
        compressed, lookup, _ = self._embed(x, self._grid_for_call(compressed_grid))
        for block in self.blocks:
            compressed, lookup = self._run_block(block, compressed, lookup)
        return self.norm(lookup)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, compressed_grid: GridSize | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, compressed_grid))

    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's hook for an official file from any source (`custom_load` in the pretrained configs): read it
        without unpickling code, then load it as timm does, through `checkpoint_filter_fn`."""
        load_official_weights(self, checkpoint_path, checkpoint_filter_fn)


def checkpoint_filter_fn(state_dict: dict, model: LookupViT) -> dict:
    """Unwrap `{"model": ...}` / `{"state_dict": ...}` and resample `pos_embed` to the model's patch grid."""
    state_dict = unwrap_state_dict(state_dict, chosen_weights(model))
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        old_side = int(round(pos_embed.shape[1] ** 0.5))
        if old_side * old_side != pos_embed.shape[1]:
            raise ValueError(f"checkpoint pos_embed {tuple(pos_embed.shape)} is not a square grid: cannot resample")
        state_dict["pos_embed"] = resample_abs_pos_embed(pos_embed, new_size=model.patch_embed.grid_size,
                                                         old_size=(old_side, old_side), num_prefix_tokens=0)
    return state_dict


def _create_lookupvit(variant: str, pretrained: bool = False, **kwargs) -> LookupViT:
    return build_backbone(LookupViT, variant, pretrained, checkpoint_filter_fn, default_out_indices=3, **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "mean": IMAGENET_INCEPTION_MEAN, "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "paper_ids": "arXiv:2407.12753", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "lookupvit_tiny_patch16_224": _cfg(),
    "lookupvit_small_patch16_224": _cfg(),
    "lookupvit_base_patch16_224": _cfg(),
    "test_lookupvit": _cfg(input_size=(3, 64, 64)),
})


@register_model
def lookupvit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> LookupViT:
    """LookupViT at ViT-Ti width (192, 12 blocks, 3 heads)."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_lookupvit("lookupvit_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def lookupvit_small_patch16_224(pretrained: bool = False, **kwargs) -> LookupViT:
    """LookupViT at ViT-S width (384, 12 blocks, 6 heads)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_lookupvit("lookupvit_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def lookupvit_base_patch16_224(pretrained: bool = False, **kwargs) -> LookupViT:
    """LookupViT at ViT-B width (768, 12 blocks, 12 heads)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_lookupvit("lookupvit_base_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def test_lookupvit(pretrained: bool = False, **kwargs) -> LookupViT:
    """A tiny LookupViT for tests and the demo: 64 px, 8-px lookup patches (64 tokens), 4 blocks of width 96."""
    args = dict(img_size=64, patch_size=8, depth=4, embed_dim=96, num_heads=3)
    return _create_lookupvit("test_lookupvit", pretrained, **dict(args, **kwargs))

"""Bi-level routing attention (BRA) of BiFormer (Zhu et al., CVPR 2023), in vectorised pure PyTorch.

The feature map is cut into an S x S grid of regions. Each region routes to the top-k regions whose mean key
best matches its mean query (region-level routing), and its tokens then attend to all tokens of those k
regions (token-level attention). A depthwise convolution of the values (LCE, "local context enhancement") is
added to the attention output before the output projection.

Semantics follow the official legacy implementation (`rayleizhu/BiFormer:ops/bra_legacy.py`) so that its
checkpoints load and give the same outputs:
- one `qkv` linear producing q (qk_dim), k (qk_dim) and v (dim); its module path is `qkv.qkv`;
- the softmax scale is `qk_dim ** -0.5` (the full qk width, not the head width) for routing and attention;
- routing is not differentiable (q and k are detached) and the routing scores do not weight the output;
- inputs whose height/width do not divide by S are zero-padded at the bottom/right and cropped back.
"""

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import nn


def tokens_to_regions(x: torch.Tensor, num_regions: int) -> torch.Tensor:
    """(B, H, W, C) map -> (B, S*S, h*w, C) tokens grouped by region (S = num_regions, h = H/S, w = W/S)."""
    batch, height, width, channels = x.shape
    rh, rw = height // num_regions, width // num_regions
    x = x.reshape(batch, num_regions, rh, num_regions, rw, channels).transpose(2, 3)
    return x.reshape(batch, num_regions * num_regions, rh * rw, channels)


def route_regions(q_regions: torch.Tensor, k_regions: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """Indices (B, R, topk) of the regions each region attends to.

    Region queries/keys are the means of the token queries/keys of each region; their scaled dot products rank
    the regions. The ranking is not differentiable, so it runs on detached tensors.
    """
    q_mean = q_regions.detach().mean(dim=2)
    k_mean = k_regions.detach().mean(dim=2)
    affinity = (q_mean * scale) @ k_mean.transpose(-2, -1)  # (B, R, R)
    return torch.topk(affinity, k=topk, dim=-1).indices


def gather_regions(x: torch.Tensor, region_index: torch.Tensor) -> torch.Tensor:
    """Select, for every query region, the tokens of its routed regions.

    x: (B, R, T, C) region tokens; region_index: (B, R, k). Returns (B, R, k*T, C).
    """
    batch, num_regions, tokens, channels = x.shape
    topk = region_index.shape[-1]
    offsets = torch.arange(batch, device=x.device).view(batch, 1, 1) * num_regions
    flat_index = (region_index + offsets).reshape(-1)
    picked = x.reshape(batch * num_regions, tokens, channels).index_select(0, flat_index)
    return picked.reshape(batch, num_regions, topk * tokens, channels)


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims; SDPA when `fused`, explicit matmuls otherwise.

    The explicit path materialises the attention matrix, which FLOP counters and memory probes can see.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    attn = (q * scale) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def bi_level_routing_attention(
        qkv: torch.Tensor,
        qk_dim: int,
        num_regions: int,
        topk: int,
        num_heads: int,
        scale: float,
        fused: bool = True,
) -> torch.Tensor:
    """Routed token attention (without LCE) on an NHWC map whose height and width divide by `num_regions`.

    qkv: (B, H, W, 2 * qk_dim + C_v), the concatenated q, k and v. Returns (B, H, W, C_v).
    """
    batch, height, width, channels = qkv.shape
    value_dim = channels - 2 * qk_dim
    if height % num_regions or width % num_regions:
        raise ValueError(f"map {height}x{width} does not divide into {num_regions}x{num_regions} regions: pad it first")
    num_cells = num_regions * num_regions
    if not 0 < topk <= num_cells:
        raise ValueError(f"topk={topk} must be in 1..{num_cells} (number of regions)")
    # One regrouping copy for q, k and v together; k and v stay adjacent so one gather serves both.
    regions = tokens_to_regions(qkv, num_regions)  # (B, R, T, 2qk + C_v)
    q_r, kv_r = regions[..., :qk_dim], regions[..., qk_dim:]
    region_index = route_regions(q_r, kv_r[..., :qk_dim], topk, scale)
    kv_sel = gather_regions(kv_r, region_index)  # (B, R, k*T, qk + C_v)

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # (B, R, L, C) -> (B*R, heads, L, C/heads), a view
        return t.reshape(batch * num_cells, t.shape[2], num_heads, -1).transpose(1, 2)

    out = multi_head_attention(split_heads(q_r), split_heads(kv_sel[..., :qk_dim]),
                               split_heads(kv_sel[..., qk_dim:]), scale, fused)  # (B*R, heads, T, C_v/heads)
    # Heads and regions back to the (B, H, W, C_v) map in one copy.
    rh, rw = height // num_regions, width // num_regions
    out = out.reshape(batch, num_regions, num_regions, num_heads, rh, rw, -1).permute(0, 1, 4, 2, 5, 3, 6)
    return out.reshape(batch, height, width, value_dim)


class QKVLinear(nn.Module):
    """The joint q/k/v projection, returning q, k and v concatenated (B, H, W, 2 * qk_dim + dim).

    A module of its own so that checkpoint keys read `qkv.qkv.*` as upstream.
    """

    def __init__(self, dim: int, qk_dim: int, bias: bool = True):
        super().__init__()
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


class BiLevelRoutingAttention(nn.Module):
    """BRA with LCE on NHWC maps of any size (padded to the region grid and cropped back).

    Args:
        dim: channels of the input and of v.
        num_heads: attention heads (head width = qk_dim / num_heads).
        num_regions: S, regions per side (BiFormer uses 7 at every resolution).
        topk: routed regions per query region (1..S*S).
        qk_dim: width of q and k (default `dim`).
        qk_scale: softmax scale (default `qk_dim ** -0.5`, the upstream convention).
        lce_kernel_size: kernel of the depthwise LCE convolution on v (0 disables it).
    """

    def __init__(self, dim: int, num_heads: int = 8, num_regions: int = 7, topk: int = 4, qk_dim: int | None = None,
                 qk_scale: float | None = None, lce_kernel_size: int = 5):
        super().__init__()
        qk_dim = qk_dim or dim
        if qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim={qk_dim} and dim={dim} must both divide by num_heads={num_heads}")
        self.num_heads = num_heads
        self.num_regions = num_regions
        self.topk = topk
        self.qk_dim = qk_dim
        self.scale = qk_scale or qk_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = QKVLinear(dim, qk_dim)
        self.lepe = nn.Conv2d(dim, dim, lce_kernel_size, padding=lce_kernel_size // 2, groups=dim) \
            if lce_kernel_size > 0 else None
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        _, height, width, _ = x.shape
        pad_h = -height % self.num_regions
        pad_w = -width % self.num_regions
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        qkv = self.qkv(x)
        out = bi_level_routing_attention(qkv, self.qk_dim, self.num_regions, self.topk, self.num_heads, self.scale,
                                         fused=self.fused_attn)
        if self.lepe is not None:
            v = qkv[..., 2 * self.qk_dim:]
            # NHWC -> NCHW view, convolve, back to NHWC.
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)
        if pad_h or pad_w:
            out = out[:, :height, :width].contiguous()
        return out

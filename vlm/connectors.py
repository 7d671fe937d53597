"""Connectors: map visual tokens (B, N, C_vision) to LLM embeddings (B, N_out, D_llm).

Each connector states how many tokens it outputs for a given input count (`num_output_tokens`).
"""

import math

import torch
from torch import nn


class IdentityConnector(nn.Module):
    """No projection: the tower's width must already equal the LLM's."""

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        if vision_dim != text_dim:
            raise ValueError(
                f"connector='identity' needs equal widths, but the vision tower gives {vision_dim} and the LLM "
                f"expects {text_dim}: use 'linear', 'mlp2x_gelu', 'pixel_shuffle' or 'perceiver'"
            )

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, x):
        return x


class LinearConnector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.proj = nn.Linear(vision_dim, text_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, x):
        return self.proj(x)


class MLPConnector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: Linear -> GELU -> Linear."""

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, text_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(text_dim, text_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return num_input_tokens

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PixelShuffleConnector(nn.Module):
    """nanoVLM-style token reduction: merge each factor x factor patch neighbourhood into one token
    (channels concatenated), then one Linear without bias. Needs a square token grid divisible by factor."""

    def __init__(self, vision_dim: int, text_dim: int, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(vision_dim * factor * factor, text_dim, bias=False)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        side = math.isqrt(num_input_tokens)
        if side * side != num_input_tokens or side % self.factor:
            raise ValueError(
                f"pixel_shuffle needs a square token grid divisible by factor={self.factor}, got {num_input_tokens} tokens"
            )
        return num_input_tokens // self.factor**2

    def forward(self, x):
        batch, num_tokens, channels = x.shape
        self.num_output_tokens(num_tokens)
        side, f = math.isqrt(num_tokens), self.factor
        x = x.reshape(batch, side // f, f, side // f, f, channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, (side // f) ** 2, f * f * channels)
        return self.proj(x)


class PerceiverLayer(nn.Module):
    """Latents attend to [visual tokens; latents] (Flamingo/AKI resampler layer), then a feed-forward."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, media, latents):
        media, normed = self.norm_media(media), self.norm_latents(latents)
        keys = torch.cat([media, normed], dim=1)
        latents = latents + self.attn(normed, keys, keys, need_weights=False)[0]
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """AKI-style resampler: a fixed number of learned latents, whatever the number of visual tokens."""

    def __init__(self, vision_dim: int, text_dim: int, num_latents: int = 64, depth: int = 2, num_heads: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, vision_dim) * vision_dim**-0.5)
        self.layers = nn.ModuleList(PerceiverLayer(vision_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(vision_dim)
        self.proj = nn.Linear(vision_dim, text_dim)

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.latents.shape[0]

    def forward(self, x):
        latents = self.latents.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.proj(self.norm(latents))


CONNECTOR_CLASSES = {
    "identity": IdentityConnector,
    "linear": LinearConnector,
    "mlp2x_gelu": MLPConnector,
    "pixel_shuffle": PixelShuffleConnector,
    "perceiver": PerceiverResampler,
}


def build_connector(name: str, vision_dim: int, text_dim: int, **kwargs) -> nn.Module:
    return CONNECTOR_CLASSES[name](vision_dim, text_dim, **kwargs)

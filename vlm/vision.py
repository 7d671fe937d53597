"""The vision tower: any timm model, returning a sequence of visual tokens (B, N, C)."""

import timm
import torch
from torch import nn


class VisionTower(nn.Module):
    """Wraps a timm model and turns its features into tokens.

    - `feature_layer=-1` takes `forward_features` (the tower's final, normed features); another index
      takes that block's output through timm's `forward_intermediates`.
    - Hierarchical towers (DaViT, BiFormer, ...) give NCHW maps: they are flattened to H*W tokens.
    - Prefix tokens (CLS, registers) are dropped unless `keep_prefix_tokens`.
    """

    def __init__(self, model: str | nn.Module, feature_layer: int = -1, keep_prefix_tokens: bool = False,
                 model_kwargs: dict | None = None, pretrained_file: str | None = None):
        super().__init__()
        if isinstance(model, nn.Module):
            self.model = model
        else:
            import vision_backbones  # noqa: F401  (registers LookupViT, BiFormer, Vim and ViG with timm)

            kwargs = dict(model_kwargs or {})
            if pretrained_file:
                kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=pretrained_file))
            self.model = timm.create_model(model, num_classes=0, **kwargs)
        self.feature_layer = feature_layer
        self.keep_prefix_tokens = keep_prefix_tokens
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)
        if feature_layer != -1 and not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"{type(self.model).__name__} has no forward_intermediates: use feature_layer=-1")

    @property
    def compressed_grid(self) -> tuple[int, int] | None:
        """A LookupViT tower's compressed-token grid (height, width) when no call passes one; None for others."""
        from vision_backbones.lookupvit import LookupViT

        return self.model.compressed_grid if isinstance(self.model, LookupViT) else None

    def set_compressed_grid(self, grid: int | tuple[int, int]) -> None:
        """Choose a LookupViT tower's compressed-token grid (m for m x m, or (h, w)). Its weights do not depend
        on the grid, and its output stays one token per lookup patch, so the visual token count is the same."""
        if self.compressed_grid is None:
            name = getattr(self.model, "pretrained_cfg", {}).get("architecture") or type(self.model).__name__
            raise ValueError(f"compressed_grid is a LookupViT option, but the vision tower is {name}")
        self.model.set_compressed_grid(grid)

    @property
    def data_config(self) -> dict:
        """timm's preprocessing settings (input size, mean, std, interpolation) for this tower."""
        return timm.data.resolve_data_config({}, model=self.model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.feature_layer == -1:
            features = self.model.forward_features(pixel_values)
            prefix = None
        else:
            outputs = self.model.forward_intermediates(
                pixel_values, indices=[self.feature_layer], intermediates_only=True,
                **({"return_prefix_tokens": True} if self.num_prefix_tokens else {}),
            )
            features, prefix = outputs[0] if self.num_prefix_tokens else (outputs[0], None)
        if features.ndim == 4:  # NCHW map -> (B, H*W, C)
            tokens = features.flatten(2).transpose(1, 2)
            if prefix is not None and self.keep_prefix_tokens:
                tokens = torch.cat([prefix, tokens], dim=1)
            return tokens
        if features.ndim != 3:
            raise ValueError(f"vision features of shape {tuple(features.shape)}: expected (B, N, C) or (B, C, H, W)")
        if not self.keep_prefix_tokens and self.num_prefix_tokens:
            features = features[:, self.num_prefix_tokens:]
        return features

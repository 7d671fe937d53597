"""Vision backbones as timm models.

Importing this package registers LookupViT, BiFormer, Vim and ViG with timm's model registry, so that
`timm.create_model("biformer_tiny")` and friends work. The operators they use live in `vision_backbones.ops`.
"""

from . import biformer, lookupvit, vig, vim

__all__ = ["biformer", "lookupvit", "vig", "vim"]

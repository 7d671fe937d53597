"""Vision backbones as timm models: importing this package registers LookupViT and BiFormer with timm's registry."""

from . import biformer, lookupvit

__all__ = ["biformer", "lookupvit"]

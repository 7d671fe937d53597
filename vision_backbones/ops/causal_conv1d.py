"""Causal depthwise 1-D convolution (the short convolution in front of Mamba's selective scan).

``y[:, c, t] = bias[c] + sum_j weight[c, j] * x[:, c, t - (k - 1) + j]`` with zeros before the sequence start,
optionally followed by SiLU. The PyTorch path left-pads with ``k - 1`` zeros and sums ``k`` shifted products (the
same as ``F.conv1d(pad(x), weight, groups=channels)``); the ``causal_conv1d`` CUDA kernel is used for CUDA tensors
when that package imports.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["causal_conv1d"]


def _cuda_causal_conv1d():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # missing package or a broken compiled extension: use PyTorch
        return None
    return causal_conv1d_fn


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None) -> torch.Tensor:
    """Depthwise causal convolution over the last axis.

    Args:
        x: (batch, channels, length).
        weight: (channels, kernel) or (channels, 1, kernel) as stored by ``nn.Conv1d(groups=channels)``.
        bias: (channels,) or None.
        activation: None or ``"silu"``.
    Returns:
        (batch, channels, length), same dtype as ``x``.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"causal_conv1d: expected x (batch, channels, length) and weight (channels, kernel); "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if x.is_cuda:
        kernel = _cuda_causal_conv1d()
        if kernel is not None:
            return kernel(x, weight, bias, activation="silu" if activation else None)
    # k shifted multiply-adds, in place on one output buffer, no padded copy: on CPU several times faster than the
    # (mkldnn) depthwise F.conv1d for this shape. Tap j of the kernel reads x shifted right by k - 1 - j.
    kernel_size, length = weight.shape[1], x.shape[-1]
    y = x * weight[:, -1:]
    if bias is not None:
        y.add_(bias[:, None])
    for shift in range(1, min(kernel_size, length)):
        y[..., shift:].addcmul_(x[..., :length - shift], weight[:, kernel_size - 1 - shift:kernel_size - shift])
    return F.silu(y, inplace=True) if activation else y

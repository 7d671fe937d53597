"""Sequence-mixing operators used by the vision backbones.

Each operator has a pure-PyTorch implementation that runs anywhere (and is what the tests check) and, where
one exists, an optional fast path that is imported lazily inside the function that uses it: CUDA kernels
(``mamba_ssm``, ``causal_conv1d``, ``fla``) only for CUDA tensors, and a numba-compiled loop for CPU inference.
A missing optional package never breaks an import.
"""

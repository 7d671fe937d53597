"""Mamba-1 selective scan (the S6 recurrence) with a chunked pure-PyTorch path and optional fast paths.

For every channel ``d`` and state index ``n`` the scan runs the diagonal linear recurrence

    h_t[d, n] = exp(delta_t[d] * A[d, n]) * h_{t-1}[d, n] + delta_t[d] * B_t[n] * u_t[d]
    y_t[d]    = sum_n C_t[n] * h_t[d, n] + D[d] * u_t[d]

and optionally gates the output with ``y * silu(z)``. Tensors use the layout of ``mamba_ssm.selective_scan_fn``
so the CUDA kernel is a drop-in fast path: ``u, delta, z: (batch, dim, length)``, ``A: (dim, state)``,
``B, C: (batch, state, length)`` or grouped ``(batch, groups, state, length)`` where the channels are split into
``groups`` equal blocks that each read their own B and C (Vim runs its two scan directions as two groups).

Paths, chosen by :func:`selective_scan` (``backend="auto"``):
- ``"cuda"``: ``mamba_ssm`` when it imports and the tensors are on CUDA;
- ``"numba"``: a compiled CPU loop for inference (no autograd, fp32 arithmetic) when numba is installed;
- ``"torch"``: the chunked form below, differentiable, used for training and as the portable path.

Chunked form: the sequence is cut into chunks of ``T`` tokens. Inside every chunk the recurrence runs from a
zero state, stepping through the ``T`` positions of all chunks at once; the state entering each chunk is then
carried chunk to chunk, and added back with the within-chunk decay ``exp(cumsum(delta * A))``. Every exponent is
a sum of non-positive log-decays, so nothing can overflow. Long sequences are processed in segments so the
``(length, dim, state)`` intermediates stay bounded in memory.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .elementwise import softplus

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_numba", "selective_scan_reference"]

# At most this many (token, channel, state) elements are materialised at once by the chunked path (~16 MiB in fp32).
_SEGMENT_ELEMENTS = 1 << 22


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp32 for half/single inputs (the recurrence is run in at least single precision), fp64 for fp64."""
    return torch.promote_types(u.dtype, torch.float32)


def _prepare(delta: torch.Tensor, delta_bias: Optional[torch.Tensor], delta_softplus: bool,
             dtype: torch.dtype) -> torch.Tensor:
    """Return the step sizes in ``dtype`` with the optional bias and softplus applied."""
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = softplus(delta)
    return delta


def _grouped(bc: torch.Tensor) -> torch.Tensor:
    """View B or C as (batch, groups, state, length)."""
    return bc.unsqueeze(1) if bc.dim() == 3 else bc


def _check_shapes(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, length), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if A.shape[0] != dim or A.dim() != 2:
        raise ValueError(f"selective_scan: A must be (dim={dim}, state), got shape {tuple(A.shape)}")
    for name, bc in (("B", B), ("C", C)):
        bc = _grouped(bc)
        if bc.shape[0] != batch or bc.shape[2] != A.shape[1] or bc.shape[3] != length or dim % bc.shape[1]:
            raise ValueError(
                f"selective_scan: {name} must be (batch, state, length) or (batch, groups, state, length) with "
                f"groups dividing dim={dim}; got shape {tuple(bc.shape)} for u {tuple(u.shape)}, A {tuple(A.shape)}")


def _finish(y: torch.Tensor, u: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor]) -> torch.Tensor:
    """Add the skip term D*u and the SiLU(z) output gate; ``y`` and the result are (batch, dim, length)."""
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence written step by step (slow; the definition the other paths are tested against)."""
    _check_shapes(u, A, B, C)
    batch, dim, length = u.shape
    dtype = _compute_dtype(u)
    delta = _prepare(delta, delta_bias, delta_softplus, dtype)
    B, C = _grouped(B).to(dtype), _grouped(C).to(dtype)
    groups = B.shape[1]
    # Expand grouped B/C to one row per channel: (batch, dim, state, length).
    B = B.repeat_interleave(dim // groups, dim=1)
    C = C.repeat_interleave(dim // groups, dim=1)
    A = A.to(dtype)
    h = u.new_zeros(batch, dim, A.shape[1], dtype=dtype)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t].to(dtype))[:, :, None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return _finish(y, u, D, z).to(u.dtype)


def _default_chunk(length: int) -> int:
    # Two Python loops run per segment: T steps inside the chunks and length/T steps between them, so T ~ sqrt(L)
    # balances them; a floor of 8 keeps each step's tensors large enough to vectorise.
    return max(8, int(math.ceil(math.sqrt(length))))


def _scan_segment(delta, u, A, B, C, h0, chunk):
    """Scan one segment in token-major layout.

    Args: delta, u (batch, L, dim); A (dim, state); B, C (batch, L, groups, state); h0 (batch, dim, state).
    Returns: y (batch, L, dim) without the D/z terms, and the final state (batch, dim, state).
    """
    batch, length, dim = u.shape
    groups, state = B.shape[2], B.shape[3]
    pad = (-length) % chunk
    if pad:
        # delta = 0 makes padded steps the identity (decay 1, no input), so the carried state is unaffected.
        delta = F.pad(delta, (0, 0, 0, pad))
        u = F.pad(u, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    padded = length + pad
    n_chunks = padded // chunk

    log_decay = delta[..., None] * A  # (batch, L, dim, state), <= 0
    decay = torch.exp(log_decay)
    per_group = dim // groups
    drive = ((delta * u).view(batch, padded, groups, per_group, 1) * B.view(batch, padded, groups, 1, state))
    drive = drive.view(batch, n_chunks, chunk, dim, state)
    decay = decay.view(batch, n_chunks, chunk, dim, state)

    # 1) Recurrence inside every chunk from a zero state, all chunks stepping together.
    h = drive[:, :, 0]
    local_states = [h]
    for t in range(1, chunk):
        h = decay[:, :, t] * h + drive[:, :, t]
        local_states.append(h)
    local = torch.stack(local_states, dim=2)  # (batch, chunks, T, dim, state)

    # 2) Carry the state across chunks: state entering chunk c+1 = total decay of chunk c * entering state + local end.
    decay_from_start = torch.exp(torch.cumsum(log_decay.view(batch, n_chunks, chunk, dim, state), dim=2))
    chunk_decay = decay_from_start[:, :, -1]
    entering = [h0]
    for c in range(n_chunks):
        entering.append(chunk_decay[:, c] * entering[-1] + local[:, c, -1])
    final_state = entering.pop()
    entering = torch.stack(entering, dim=1)  # (batch, chunks, dim, state)

    # 3) Full states and the C readout as one batched matmul per (token, group).
    states = local + decay_from_start * entering[:, :, None]
    states = states.view(batch * padded * groups, per_group, state)
    y = torch.bmm(states, C.reshape(batch * padded * groups, state, 1)).view(batch, padded, dim)
    return y[:, :length], final_state


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           chunk_size: Optional[int] = None):
    """Differentiable chunked selective scan in pure PyTorch (see the module docstring for the layout)."""
    _check_shapes(u, A, B, C)
    batch, dim, length = u.shape
    dtype = _compute_dtype(u)
    delta = _prepare(delta, delta_bias, delta_softplus, dtype).transpose(1, 2)
    u_t = u.to(dtype).transpose(1, 2)
    A = A.to(dtype)
    state = A.shape[1]
    B_t = _grouped(B).to(dtype).permute(0, 3, 1, 2)  # (batch, L, groups, state)
    C_t = _grouped(C).to(dtype).permute(0, 3, 1, 2)
    segment = max(1, _SEGMENT_ELEMENTS // (batch * dim * state))
    chunk = chunk_size or _default_chunk(min(length, segment))
    segment = max(chunk, segment // chunk * chunk)
    h = u.new_zeros(batch, dim, state, dtype=dtype)
    ys = []
    for start in range(0, length, segment):
        sl = slice(start, start + segment)
        y, h = _scan_segment(delta[:, sl], u_t[:, sl], A, B_t[:, sl], C_t[:, sl], h, chunk)
        ys.append(y)
    y = torch.cat(ys, dim=1).transpose(1, 2)
    return _finish(y, u, D, z).to(u.dtype)


def selective_scan_numba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Inference-only selective scan on CPU with a numba-compiled loop, computed in fp32 (no autograd).

    Raises ImportError when numba is not installed.
    """
    from .selective_scan_numba import (
        scan_kernel,  # lazy: numba is optional and compiles on first use
    )

    _check_shapes(u, A, B, C)
    if u.device.type != "cpu":
        raise ValueError(f"selective_scan_numba runs on CPU tensors, got device {u.device}")
    batch, dim, _ = u.shape
    with torch.no_grad():
        def f32(t):
            return t.detach().to(torch.float32).contiguous()

        y = torch.empty(u.shape, dtype=torch.float32)
        args = (
            f32(u).numpy(), f32(delta).numpy(),
            (f32(delta_bias) if delta_bias is not None else torch.zeros(dim)).numpy(), bool(delta_softplus),
            f32(A).numpy(),
            f32(_grouped(B).transpose(2, 3)).numpy(),  # (batch, groups, L, state): contiguous per token
            f32(_grouped(C).transpose(2, 3)).numpy(),
            (f32(D) if D is not None else torch.zeros(dim)).numpy(),
            (f32(z) if z is not None else torch.empty(0, 0, 0)).numpy(),
            torch.zeros(batch, dim, A.shape[1]).numpy(), y.numpy())
        # Split the channels over as many threads as PyTorch uses (threads block when idle, unlike an OpenMP pool).
        workers = max(1, min(torch.get_num_threads(), dim))
        bounds = [dim * i // workers for i in range(workers + 1)]
        if workers == 1:
            scan_kernel(*args, 0, dim)
        else:
            list(_thread_pool(workers).map(lambda i: scan_kernel(*args, bounds[i], bounds[i + 1]), range(workers)))
        return y.to(u.dtype)


@functools.lru_cache(maxsize=None)
def _thread_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="selective_scan")


def _cuda_selective_scan():
    """``mamba_ssm.selective_scan_fn`` or None when the package (or its compiled extension) is unavailable."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA extension (undefined symbol): fall back to PyTorch
        return None
    return selective_scan_fn


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                   backend: str = "auto", chunk_size: Optional[int] = None):
    """Selective scan ``y = SSM(A, B, C, delta)(u) + D*u``, gated by ``silu(z)`` when ``z`` is given.

    Args:
        u, delta, z: (batch, dim, length). A: (dim, state), usually ``-exp(A_log)``.
        B, C: (batch, state, length) or (batch, groups, state, length). D, delta_bias: (dim,).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        backend: ``"auto"`` (CUDA kernel for CUDA tensors when ``mamba_ssm`` imports; numba on CPU when nothing
            needs gradients; else PyTorch), or force ``"torch"``, ``"numba"`` or ``"cuda"``.
        chunk_size: chunk length of the PyTorch path (default ~sqrt(length)).
    Returns:
        y: (batch, dim, length) in the dtype of ``u``.
    """
    if backend not in ("auto", "torch", "numba", "cuda"):
        raise ValueError(f"selective_scan: unknown backend {backend!r}; use auto, torch, numba or cuda")
    if backend in ("auto", "cuda") and u.is_cuda:
        kernel = _cuda_selective_scan()
        if kernel is not None:
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        if backend == "cuda":
            raise ImportError("selective_scan(backend='cuda') needs the mamba_ssm package with its CUDA extension")
    if backend == "cuda" and not u.is_cuda:
        raise ValueError("selective_scan(backend='cuda') needs CUDA tensors")
    use_numba = backend == "numba" or (
        backend == "auto" and u.device.type == "cpu" and u.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not _needs_grad(u, delta, A, B, C, D, z, delta_bias) and _numba_available())
    if use_numba:
        return selective_scan_numba(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size)

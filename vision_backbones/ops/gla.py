"""Gated linear attention (GLA) and ViG's bidirectional form, chunked in pure PyTorch.

Per head, with a key-wise forget gate ``alpha_t = exp(g_t)`` (``g_t <= 0``, the "log gate"):

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t        (state: head_k_dim x head_v_dim)
    o_t = (scale * q_t) S_t                         (scale defaults to head_k_dim ** -0.5, as in fla)

Layout (as in ViG's fla fork): ``q, k, g: (batch, heads, length, head_k_dim)``, ``v: (batch, heads, length,
head_v_dim)``.

Chunked form: cut the sequence into chunks of ``T`` tokens and let ``G`` be the cumulative log gate inside each
chunk. The state entering every chunk is carried chunk to chunk (one small matmul per chunk); the output is the
entering state read by ``q * exp(G)`` plus an intra-chunk causal "attention" ``A[t, s] = sum_j q_tj k_sj
exp(G_tj - G_sj)`` (s <= t) applied to ``v``. When a chunk's total log gate stays above ``-_FACTORISE_LIMIT``, ``A``
factorises into one matmul ``(q exp(G)) (k exp(-G))^T`` without overflow; otherwise the exact pairwise form is used.
All other exponents are differences of cumulative log gates that are <= 0.

``bidirectional_gated_linear_attention`` runs the forward scan and the backward scan (on the flipped sequence,
with its own gates) as one batched call and averages them, which is ViG's training path; its fused Triton
"bid" kernel computes the same thing.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["gated_linear_attention", "gated_linear_attention_reference", "bidirectional_gated_linear_attention"]

# The factorised intra-chunk form (q e^G)(k e^-G)^T is used while every chunk's total log gate is above -20: no
# overflow (e^20 ~ 5e8) and rounding G to fp32 costs at most ~1e-6 relative error. ViG's gates (logsigmoid / 16)
# rarely get near that; stronger gates take the exact pairwise form.
_FACTORISE_LIMIT = 20.0
_DEFAULT_MAX_CHUNK = 32


def _check(q, k, v, g):
    if q.dim() != 4 or q.shape != k.shape or q.shape != g.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError("gated_linear_attention: expected q, k, g (batch, heads, length, head_k_dim) and v "
                         f"(batch, heads, length, head_v_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, g {tuple(g.shape)}")


def gated_linear_attention_reference(q, k, v, g, scale: Optional[float] = None,
                                     initial_state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The recurrence step by step (slow; the definition the chunked path is tested against).

    Returns ``(o, final_state)`` with ``o`` like ``v`` and ``final_state`` (batch, heads, head_k_dim, head_v_dim).
    """
    _check(q, k, v, g)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    b, h, length, dk = q.shape
    state = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(length):
        state = g[:, :, t].exp()[..., None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(((q[:, :, t] * scale)[..., None, :] @ state).squeeze(-2))
    return torch.stack(outputs, dim=2).to(v.dtype), state


def _chunk_length(length: int, max_chunk: int) -> int:
    # Equal chunks of at most max_chunk tokens, so padding is below one token per chunk (196 -> 7 chunks of 28 for max_chunk 32).
    return math.ceil(length / math.ceil(length / max_chunk))


def _gla_chunked(q, k, v, g, scale, initial_state, max_chunk):
    dtype = torch.promote_types(q.dtype, torch.float32)
    b, h, length, dk = q.shape
    dv = v.shape[-1]
    chunk = _chunk_length(length, max_chunk)
    pad = (-length) % chunk
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    if pad:  # zero keys/values add nothing and a zero log gate keeps the state, so padding is inert
        q, k, v, g = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, g))
    n_chunks = (length + pad) // chunk
    q, k, g = (t.reshape(b, h, n_chunks, chunk, dk) for t in (q * scale, k, g))
    v = v.reshape(b, h, n_chunks, chunk, dv)

    # Cumulative log gates are summed in fp64 and differenced before rounding to fp32: exponents are differences of
    # cumulative sums that can reach -1e3, where fp32 cancellation would cost ~1e-4 relative accuracy.
    cum64 = torch.cumsum(g.to(torch.float64), dim=3)  # log decay from the chunk start up to each token (inclusive)
    total64 = cum64[:, :, :, -1:]  # (b, h, chunks, 1, dk)
    cum = cum64.to(dtype)
    q_decayed = q * cum.exp()

    # State entering each chunk: S_{c+1} = exp(total_c) S_c + (k exp(total_c - cum))^T v.
    chunk_kv = (k * (total64 - cum64).to(dtype).exp()).transpose(-1, -2) @ v  # (b, h, chunks, dk, dv)
    chunk_decay = total64.squeeze(3).to(dtype).exp()[..., None]  # (b, h, chunks, dk, 1)
    state = q.new_zeros(b, h, dk, dv) if initial_state is None else initial_state.to(dtype)
    entering = []
    for c in range(n_chunks):
        entering.append(state)
        state = chunk_decay[:, :, c] * state + chunk_kv[:, :, c]
    out = q_decayed @ torch.stack(entering, dim=2)

    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    if total64.min() >= -_FACTORISE_LIMIT:
        # exp(cum) and exp(-cum) each carry a relative error of |cum| * eps(fp32) <= 20 * 6e-8 here.
        scores = q_decayed @ (k * (-cum).exp()).transpose(-1, -2)
    else:  # a very strong gate somewhere: exact pairwise decays, masked before exp so nothing overflows
        diff = (cum64[..., :, None, :] - cum64[..., None, :, :]).masked_fill(~causal[..., None], float("-inf"))
        scores = (q[..., :, None, :] * k[..., None, :, :] * diff.to(dtype).exp()).sum(-1)
    out = out + scores.masked_fill(~causal, 0.0) @ v
    out = out.reshape(b, h, n_chunks * chunk, dv)[:, :, :length]
    return out, state


def gated_linear_attention(q, k, v, g, scale: Optional[float] = None, initial_state: Optional[torch.Tensor] = None,
                           max_chunk: int = _DEFAULT_MAX_CHUNK) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated linear attention (differentiable, pure PyTorch).

    Args:
        q, k: (batch, heads, length, head_k_dim). v: (batch, heads, length, head_v_dim).
        g: log forget gates, same shape as k, <= 0 (e.g. ``logsigmoid(x) / 16``).
        scale: query scale, default ``head_k_dim ** -0.5``.
        initial_state: optional (batch, heads, head_k_dim, head_v_dim).
        max_chunk: longest chunk; the sequence is split into equal chunks no longer than this.
    Returns:
        ``(o, final_state)``: o (batch, heads, length, head_v_dim) in v's dtype; the state after the last token.
    """
    _check(q, k, v, g)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, state = _gla_chunked(q, k, v, g, scale, initial_state, max_chunk)
    return out.to(v.dtype), state


def _fla_chunk_gla():
    try:
        from fla.ops.gla import chunk_gla
    except Exception:  # not installed, or Triton unusable on this platform
        return None
    return chunk_gla


def _run_fla(chunk_gla, q, k, v, g, scale):
    """Call fla's chunk kernel with our (batch, heads, length, dim) layout across fla versions: the ViG fork takes
    this layout, fla with ``head_first`` takes it on request, recent fla (with ``cu_seqlens``) takes
    (batch, length, heads, dim). Some versions return ``o`` alone, others ``(o, final_state)``."""
    params = inspect.signature(chunk_gla).parameters
    if "head_first" in params:
        result = chunk_gla(q, k, v, g, scale=scale, head_first=True)
    elif "cu_seqlens" in params:
        result = chunk_gla(*(t.transpose(1, 2) for t in (q, k, v, g)), scale=scale)
        result = (result[0] if isinstance(result, tuple) else result).transpose(1, 2)
    else:
        result = chunk_gla(q, k, v, g, scale=scale)
    return result[0] if isinstance(result, tuple) else result


def bidirectional_gated_linear_attention(q, k, v, g_forward, g_backward, scale: Optional[float] = None,
                                         max_chunk: int = _DEFAULT_MAX_CHUNK) -> torch.Tensor:
    """ViG's bidirectional GLA: ``(GLA(x; g_fwd) + flip(GLA(flip(x); flip(g_bwd)))) / 2``.

    Both directions read the same q, k, v; each has its own log gates (same shape as ``k``). The two scans run as
    one batched call. Uses fla's ``chunk_gla`` for CUDA tensors when fla imports, else the chunked PyTorch path.
    Returns (batch, heads, length, head_v_dim).
    """
    _check(q, k, v, g_forward)
    if g_backward.shape != g_forward.shape:
        raise ValueError(f"bidirectional_gated_linear_attention: g_backward {tuple(g_backward.shape)} must match "
                         f"g_forward {tuple(g_forward.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch = q.shape[0]
    q2, k2, v2 = (torch.cat([t, t.flip(2)]) for t in (q, k, v))
    g2 = torch.cat([g_forward, g_backward.flip(2)])
    chunk_gla = _fla_chunk_gla() if q.is_cuda else None
    if chunk_gla is not None:
        out = _run_fla(chunk_gla, q2, k2, v2, g2, scale)
    else:
        out, _ = _gla_chunked(q2, k2, v2, g2, scale, None, max_chunk)
    return ((out[:batch] + out[batch:].flip(2)) / 2).to(v.dtype)

"""Numba-compiled CPU loop for the selective scan (inference only; imported lazily by ``selective_scan``).

One pass per (batch, channel) row and block of tokens computes the step sizes (bias + softplus), runs the
recurrence with its ``state`` values in a small buffer, and applies the ``D`` skip and the ``silu(z)`` gate, so no
(length, dim, state) tensor is allocated and no extra elementwise passes run in PyTorch.

Numba has no vectorised ``exp``/``log`` without Intel SVML, so :func:`_exp` and :func:`_log1p_small` are written
out (exponent bits plus polynomials, relative error ~2e-7) in a form LLVM vectorises; ``error_model="numpy"``
drops the zero-division checks that would otherwise block vectorisation. Parallelism comes from the caller running
channel ranges in plain Python threads (the kernel releases the GIL), not from a numba thread pool: numba's OpenMP
pool spinning next to PyTorch's on the same cores slows both down. Compiled on first use, cached on disk.
"""
import math

import numba
import numpy as np

_LOG2E = np.float32(1.0 / math.log(2.0))
_LN2 = np.float32(math.log(2.0))
_BLOCK = 128  # tokens per time block


@numba.njit(fastmath=True, error_model="numpy", inline="always")
def _exp(x):
    """exp(x) for float32 x, clamped to [2**-126, 2**127]: 2**k times a degree-7 polynomial of the remainder."""
    t = min(max(x * _LOG2E, np.float32(-126.0)), np.float32(127.0))
    k = np.floor(t + np.float32(0.5))
    r = (t - k) * _LN2  # |r| <= ln(2)/2
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    bits = np.int32(np.int32(k) + 127) << 23
    return p * np.float32(np.int32(bits).view(np.float32))


@numba.njit(fastmath=True, error_model="numpy", inline="always")
def _log1p_small(e):
    """log(1 + e) for 0 <= e <= 1 as 2*atanh(s), s = e / (2 + e) <= 1/3 (odd series to s**13)."""
    s = e / (np.float32(2.0) + e)
    s2 = s * s
    p = np.float32(1.0 / 13.0)
    p = p * s2 + np.float32(1.0 / 11.0)
    p = p * s2 + np.float32(1.0 / 9.0)
    p = p * s2 + np.float32(1.0 / 7.0)
    p = p * s2 + np.float32(1.0 / 5.0)
    p = p * s2 + np.float32(1.0 / 3.0)
    p = p * s2 + np.float32(1.0)
    return np.float32(2.0) * s * p


@numba.njit(fastmath=True, error_model="numpy", cache=True, nogil=True)
def scan_kernel(u, delta, delta_bias, softplus, A, B, C, D, z, h_state, y, first_channel, stop_channel):
    """Run the selective scan over a whole sequence, in place.

    Args:
        u, delta: (batch, dim, L) float32 (raw delta: ``delta_bias`` and, if ``softplus``, softplus applied here).
        delta_bias, D: (dim,) float32 (zeros when absent). A: (dim, state) float32, non-positive.
        B, C: (batch, groups, L, state) float32.
        h_state: (batch, dim, state) float32, the entering state, overwritten with the leaving state.
        z: (batch, dim, L) float32 gate (output multiplied by ``silu(z)``), or an empty (0, 0, 0) array for none.
        y: (batch, dim, L) float32 output.
        first_channel, stop_channel: the channel range this call computes (calls on disjoint ranges can run in
            parallel threads: the kernel releases the GIL).
    """
    batch, dim, length = u.shape
    groups, state = B.shape[1], B.shape[3]
    per_group = dim // groups
    gated = z.shape[0] > 0
    step = np.empty(_BLOCK, dtype=np.float32)
    decay = np.empty(state, dtype=np.float32)
    for b in range(batch):
        # Time blocks outermost: the block's B and C rows (shared by all channels of a group) stay in cache while
        # every channel advances its state through the block.
        for start in range(0, length, _BLOCK):
            stop = min(start + _BLOCK, length)
            for d in range(first_channel, stop_channel):
                g = d // per_group
                # Branches sit outside the loops so that LLVM vectorises each loop.
                for t in range(start, stop):
                    step[t - start] = delta[b, d, t] + delta_bias[d]
                if softplus:
                    for i in range(stop - start):
                        x = step[i]
                        step[i] = max(x, np.float32(0.0)) + _log1p_small(_exp(-abs(x)))
                h = h_state[b, d]
                for t in range(start, stop):
                    dt = step[t - start]
                    drive = dt * u[b, d, t]
                    for n in range(state):
                        decay[n] = _exp(dt * A[d, n])
                    acc = np.float32(0.0)
                    for n in range(state):
                        hn = decay[n] * h[n] + drive * B[b, g, t, n]
                        h[n] = hn
                        acc += C[b, g, t, n] * hn
                    y[b, d, t] = acc + D[d] * u[b, d, t]
                if gated:
                    for t in range(start, stop):
                        zt = z[b, d, t]
                        y[b, d, t] *= zt / (np.float32(1.0) + _exp(-zt))

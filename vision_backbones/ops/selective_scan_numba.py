"""Numba-compiled CPU loop for the selective scan (inference only; imported lazily by ``selective_scan``).

One pass per (batch, channel) row walks the sequence once with its ``state`` values held in a small buffer, so
no (length, dim, state) tensor is allocated. The decays ``exp(delta * A)`` are the bulk of the work; numba has no
vectorised ``exp`` without Intel SVML, so :func:`scan_kernel` evaluates ``2**x`` itself (exponent bits plus a
degree-7 polynomial, relative error ~2e-7) in a loop LLVM can vectorise. The kernel is serial on purpose: a
numba thread pool next to PyTorch's OpenMP pool on the same cores slows both down. Compiled on first use and
cached on disk.
"""
import math

import numba
import numpy as np

_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


@numba.njit(fastmath=True, cache=True)
def scan_kernel(u, delta, A, B, C, h_state, y):
    """Advance the scan over one segment, in place.

    Args:
        u, delta: (batch, dim, L) float32, delta already through bias and softplus.
        A: (dim, state) float32 (non-positive). B, C: (batch, groups, L, state) float32.
        h_state: (batch, dim, state) float32, the entering state, overwritten with the leaving state.
        y: (batch, dim, L) float32 output, ``sum_n C * h`` (without the D and z terms).
    """
    batch, dim, length = u.shape
    groups, state = B.shape[1], B.shape[3]
    per_group = dim // groups
    exponent_bits = np.empty(state, dtype=np.int32)
    power_of_two = exponent_bits.view(np.float32)
    decay = np.empty(state, dtype=np.float32)
    a2 = np.empty(state, dtype=np.float32)
    for b in range(batch):
        for d in range(dim):
            g = d // per_group
            h = h_state[b, d]
            for n in range(state):
                a2[n] = A[d, n] * _LOG2E
            for t in range(length):
                step = delta[b, d, t]
                drive = step * u[b, d, t]
                for n in range(state):
                    # exp(step * A) = 2**x with x <= 0; below 2**-126 the decay is zero for all practical purposes.
                    x = max(step * a2[n], np.float32(-126.0))
                    k = np.floor(x + np.float32(0.5))
                    r = (x - k) * np.float32(_LN2)  # |r| <= ln(2)/2
                    p = np.float32(1.0 / 5040.0)
                    p = p * r + np.float32(1.0 / 720.0)
                    p = p * r + np.float32(1.0 / 120.0)
                    p = p * r + np.float32(1.0 / 24.0)
                    p = p * r + np.float32(1.0 / 6.0)
                    p = p * r + np.float32(0.5)
                    p = p * r + np.float32(1.0)
                    p = p * r + np.float32(1.0)
                    exponent_bits[n] = (np.int32(k) + 127) << 23
                    decay[n] = p * power_of_two[n]
                acc = np.float32(0.0)
                for n in range(state):
                    hn = decay[n] * h[n] + drive * B[b, g, t, n]
                    h[n] = hn
                    acc += C[b, g, t, n] * hn
                y[b, d, t] = acc

"""Sequence operators of vision_backbones.ops: chunked/compiled paths against step-by-step recurrences."""
import math

import pytest
import torch
import torch.nn.functional as F

from vision_backbones.ops import gla as gla_ops
from vision_backbones.ops import selective_scan as scan_ops
from vision_backbones.ops.causal_conv1d import causal_conv1d
from vision_backbones.ops.elementwise import log_sigmoid, softplus
from vision_backbones.ops.gla import (bidirectional_gated_linear_attention, gated_linear_attention,
                                      gated_linear_attention_reference)
from vision_backbones.ops.selective_scan import (selective_scan, selective_scan_chunked, selective_scan_numba,
                                                 selective_scan_reference)

REL_TOL = 1e-5


def assert_close_rel(actual, expected, rel=REL_TOL, what=""):
    """Max abs error relative to the largest reference value (fp32 vs an fp64 reference)."""
    scale = expected.abs().max().clamp_min(1e-12)
    error = ((actual.double() - expected.double()).abs().max() / scale).item()
    assert error <= rel, f"{what}: relative error {error:.2e} > {rel:.0e}"


def scan_inputs(batch=2, dim=6, length=21, state=4, groups=2, seed=0, delta_scale=1.0, a_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(batch, dim, length, generator=g),
        delta=torch.randn(batch, dim, length, generator=g) * delta_scale,
        A=-torch.rand(dim, state, generator=g) * a_scale - 0.1,
        B=torch.randn(batch, groups, state, length, generator=g),
        C=torch.randn(batch, groups, state, length, generator=g),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.5,
    )


def hand_written_scan(u, delta, A, B, C, D, z, delta_bias):
    """The S6 recurrence with plain Python loops over every index (independent of the module's reference)."""
    batch, dim, length = u.shape
    groups, state = B.shape[1], B.shape[2]
    y = torch.zeros(batch, dim, length, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            g = d // (dim // groups)
            h = [0.0] * state
            for t in range(length):
                step = math.log1p(math.exp(delta[b, d, t].item() + delta_bias[d].item()))
                out = 0.0
                for n in range(state):
                    h[n] = math.exp(step * A[d, n].item()) * h[n] + step * B[b, g, n, t].item() * u[b, d, t].item()
                    out += C[b, g, n, t].item() * h[n]
                zz = z[b, d, t].item()
                y[b, d, t] = (out + D[d].item() * u[b, d, t].item()) * zz / (1 + math.exp(-zz))
    return y


def test_reference_scan_matches_hand_written_loops():
    x = scan_inputs(batch=1, dim=4, length=5, state=3)
    expected = hand_written_scan(**x)
    actual = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    assert_close_rel(actual, expected, rel=1e-12, what="reference")


@pytest.mark.parametrize("length,chunk", [(1, None), (7, 4), (16, 8), (21, 8), (33, None), (64, 16)])
def test_chunked_scan_matches_recurrence_forward_and_backward(length, chunk):
    x = scan_inputs(length=length)
    x64 = {k: v.double().requires_grad_() for k, v in x.items()}
    x32 = {k: v.clone().requires_grad_() for k, v in x.items()}
    expected = selective_scan_reference(**x64, delta_softplus=True)
    actual = selective_scan_chunked(**x32, delta_softplus=True, chunk_size=chunk)
    assert actual.dtype == torch.float32
    assert_close_rel(actual, expected, what=f"forward L={length}")
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (expected * weights).sum().backward()
    (actual * weights.float()).sum().backward()
    for name in x:
        assert_close_rel(x32[name].grad, x64[name].grad, what=f"grad {name} L={length}")


def test_chunked_scan_segments_carry_state(monkeypatch):
    """Long inputs are cut into segments; force tiny segments and compare with the recurrence."""
    monkeypatch.setattr(scan_ops, "_SEGMENT_ELEMENTS", 2 * 6 * 4 * 5)  # 5 tokens per segment
    x = scan_inputs(length=23, groups=1)
    x["B"], x["C"] = x["B"][:, 0], x["C"][:, 0]  # ungrouped (batch, state, length) form
    expected = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    actual = selective_scan_chunked(**x, delta_softplus=True, chunk_size=2)
    assert_close_rel(actual, expected, what="segmented")


def test_chunked_scan_is_stable_with_strong_decay():
    """delta*A down to about -800 per step: every exponent must stay non-positive (no inf/nan)."""
    x = scan_inputs(length=40, delta_scale=30.0, a_scale=16.0)
    expected = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    actual = selective_scan_chunked(**x, delta_softplus=True, chunk_size=16)
    assert torch.isfinite(actual).all()
    assert_close_rel(actual, expected, what="strong decay")


@pytest.mark.parametrize("length,optional,threads", [(1, True, 1), (13, True, 2), (300, True, 2), (50, False, 1)])
def test_numba_scan_matches_recurrence(length, optional, threads, monkeypatch):
    """Numba kernel (time blocks of 128, channels split over threads) with and without D, z, bias, softplus."""
    pytest.importorskip("numba")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = scan_inputs(length=length, delta_scale=3.0, a_scale=8.0)
    if not optional:
        x = {k: v for k, v in x.items() if k not in ("D", "z", "delta_bias")}
        x["delta"] = x["delta"].abs()  # positive steps without softplus
    softplus = optional
    expected = selective_scan_reference(**{k: v.double() for k, v in x.items()}, delta_softplus=softplus)
    actual = selective_scan_numba(**x, delta_softplus=softplus)
    assert_close_rel(actual, expected, what=f"numba L={length}")


def test_fast_softplus_and_log_sigmoid_match_torch():
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.randn(1000) * 1e-3, torch.tensor([0.0, -1e-30, 1e-30])])
    for fast, slow in ((softplus, F.softplus), (log_sigmoid, F.logsigmoid)):
        expected = slow(x.double())
        error = ((fast(x).double() - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()
        assert error < 1e-6, (fast.__name__, error)


def test_auto_backend_keeps_gradients_and_uses_fast_path_without_them(monkeypatch):
    x = scan_inputs(length=12)
    x = {k: v.requires_grad_() for k, v in x.items()}
    y = selective_scan(**x, delta_softplus=True)
    assert y.requires_grad  # the differentiable PyTorch path was taken
    calls = []
    monkeypatch.setattr(scan_ops, "selective_scan_numba", lambda *a, **k: calls.append(1) or "numba")
    monkeypatch.setattr(scan_ops, "_numba_available", lambda: True)
    with torch.no_grad():
        assert selective_scan(**x, delta_softplus=True) == "numba"
    assert calls == [1]
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**x, backend="triton")


def test_selective_scan_rejects_bad_shapes():
    x = scan_inputs()
    x["A"] = x["A"][:3]
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_chunked(**x)


@pytest.mark.parametrize("length", [9, 2])
def test_causal_conv1d_matches_explicit_sum(length):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, length, generator=g), torch.randn(5, 1, 4, generator=g), torch.randn(5, generator=g)
    expected = torch.zeros(2, 5, length)
    for t in range(length):
        for j in range(4):
            src = t - 3 + j
            if src >= 0:
                expected[:, :, t] += w[:, 0, j] * x[:, :, src]
    expected += b[:, None]
    torch.testing.assert_close(causal_conv1d(x, w, b), expected)
    torch.testing.assert_close(causal_conv1d(x, w[:, 0], b, activation="silu"), F.silu(expected))
    torch.testing.assert_close(causal_conv1d(x, w, None), expected - b[:, None])
    # Causality: changing the future never changes the past.
    x2 = x.clone()
    x2[..., 1:] += 1
    torch.testing.assert_close(causal_conv1d(x2, w, b)[..., :1], expected[..., :1])


def gla_inputs(batch=2, heads=2, length=21, dk=4, dv=6, seed=0, gate_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(batch, heads, length, dk, generator=g),
        k=torch.randn(batch, heads, length, dk, generator=g),
        v=torch.randn(batch, heads, length, dv, generator=g),
        g=F.logsigmoid(torch.randn(batch, heads, length, dk, generator=g) * gate_scale) / (16 / gate_scale),
    )


@pytest.mark.parametrize("length,max_chunk,gate_scale", [(1, 8, 1.0), (21, 8, 1.0), (32, 16, 1.0), (37, 64, 1.0),
                                                         (45, 16, 40.0)])
def test_chunked_gla_matches_recurrence_forward_and_backward(length, max_chunk, gate_scale):
    x = gla_inputs(length=length, gate_scale=gate_scale)
    state0 = torch.randn(2, 2, 4, 6, generator=torch.Generator().manual_seed(3))
    x64 = {k: v.double().requires_grad_() for k, v in x.items()}
    x32 = {k: v.clone().requires_grad_() for k, v in x.items()}
    expected, expected_state = gated_linear_attention_reference(**x64, initial_state=state0.double())
    actual, actual_state = gated_linear_attention(**x32, initial_state=state0, max_chunk=max_chunk)
    assert_close_rel(actual, expected, what="gla forward")
    assert_close_rel(actual_state, expected_state, what="gla final state")
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (expected * weights).sum().backward()
    (actual * weights.float()).sum().backward()
    for name in x:
        assert_close_rel(x32[name].grad, x64[name].grad, what=f"gla grad {name}")


def test_gla_pairwise_path_is_used_and_exact_for_strong_gates(monkeypatch):
    """With a chunk total log gate below the factorisation limit the exact pairwise form must be taken."""
    x = gla_inputs(length=24)
    x["g"] = x["g"] * 0 - 10.0  # log decay -10 per step: -240 over a chunk of 24
    monkeypatch.setattr(gla_ops, "_FACTORISE_LIMIT", 1e9)  # force the factorised form: it must overflow
    bad, _ = gated_linear_attention(**x, max_chunk=24)
    assert not torch.isfinite(bad).all()
    monkeypatch.undo()
    good, _ = gated_linear_attention(**x, max_chunk=24)
    expected, _ = gated_linear_attention_reference(**{k: v.double() for k, v in x.items()})
    assert_close_rel(good, expected, what="pairwise")


def bidirectional_loops(q, k, v, g_fwd, g_bwd):
    """ViG's fused "bid" kernel semantics: a forward and a backward state walked in place, outputs averaged."""
    batch, heads, length, dk = q.shape
    q = q * dk ** -0.5
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=torch.float64)
    state = torch.zeros(batch, heads, dk, v.shape[-1], dtype=torch.float64)
    for t in range(length):
        state = g_fwd[:, :, t].exp()[..., None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        out[:, :, t] += (q[:, :, t, None, :] @ state)[:, :, 0]
    state = torch.zeros_like(state)
    for t in reversed(range(length)):
        state = g_bwd[:, :, t].exp()[..., None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        out[:, :, t] += (q[:, :, t, None, :] @ state)[:, :, 0]
    return out / 2


@pytest.mark.parametrize("length", [5, 30])
def test_bidirectional_gla_matches_two_direction_recurrence(length):
    x = gla_inputs(length=length)
    g_bwd = gla_inputs(length=length, seed=7)["g"]
    x64 = {k: v.double().requires_grad_() for k, v in x.items()}
    g_bwd64 = g_bwd.double().requires_grad_()
    x32 = {k: v.clone().requires_grad_() for k, v in x.items()}
    g_bwd32 = g_bwd.clone().requires_grad_()
    expected = bidirectional_loops(x64["q"], x64["k"], x64["v"], x64["g"], g_bwd64)
    actual = bidirectional_gated_linear_attention(x32["q"], x32["k"], x32["v"], x32["g"], g_bwd32, max_chunk=8)
    assert_close_rel(actual, expected, what="bidirectional forward")
    expected.sum().backward()
    actual.sum().backward()
    assert_close_rel(g_bwd32.grad, g_bwd64.grad, what="grad g_backward")
    for name in x:
        assert_close_rel(x32[name].grad, x64[name].grad, what=f"grad {name}")

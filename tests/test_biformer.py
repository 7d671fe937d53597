"""BiFormer: routing attention against hand-built references, the timm model API, and the official key layout."""

import io

import pytest
import timm
import torch
import torch.nn.functional as F

from vision_backbones.biformer import BiFormer
from vision_backbones.ops.routing_attention import BiLevelRoutingAttention




def _project(attn: BiLevelRoutingAttention, x: torch.Tensor, qk_dim: int):
    """q, k, v of `attn` computed by hand from its weights (NHWC)."""
    qkv = x @ attn.qkv.qkv.weight.T + attn.qkv.qkv.bias
    return qkv[..., :qk_dim], qkv[..., qk_dim:2 * qk_dim], qkv[..., 2 * qk_dim:]


def _lce(attn: BiLevelRoutingAttention, v: torch.Tensor) -> torch.Tensor:
    weight = attn.lepe.weight
    out = F.conv2d(v.permute(0, 3, 1, 2), weight, attn.lepe.bias, padding=weight.shape[-1] // 2, groups=v.shape[-1])
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("fused", [True, False])
def test_routing_with_all_regions_equals_dense_attention_plus_lce(fused):
    torch.manual_seed(0)
    dim, heads, regions = 16, 2, 3
    attn = BiLevelRoutingAttention(dim, num_heads=heads, num_regions=regions, topk=regions * regions)
    attn.fused_attn = fused
    x = torch.randn(2, 10, 11, dim)  # 10x11 does not divide by 3: padded to 12x12 and cropped back
    with torch.no_grad():
        out = attn(x)

        # Dense reference: pad, every token attends to every token, scale qk_dim^-0.5 (upstream), + LCE, wo, crop.
        padded = F.pad(x, (0, 0, 0, 1, 0, 2))
        batch, height, width, _ = padded.shape
        q, k, v = _project(attn, padded, dim)
        qh, kh, vh = (t.reshape(batch, height * width, heads, -1).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(qh @ kh.transpose(-1, -2) * dim ** -0.5, dim=-1)
        dense = (weights @ vh).transpose(1, 2).reshape(batch, height, width, dim)
        expected = ((dense + _lce(attn, v)) @ attn.wo.weight.T + attn.wo.bias)[:, :10, :11]
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_routing_top_k_matches_per_region_loop():
    torch.manual_seed(1)
    dim, heads, regions, topk, side = 8, 2, 2, 2, 4  # 4 regions of 2x2 tokens, each routed to 2 of them
    attn = BiLevelRoutingAttention(dim, num_heads=heads, num_regions=regions, topk=topk)
    attn.fused_attn = False
    x = torch.randn(1, side * regions, side * regions, dim)
    with torch.no_grad():
        out = attn(x)
        q, k, v = _project(attn, x, dim)
        expected = torch.zeros_like(v)
        cells = [(i, j) for i in range(regions) for j in range(regions)]

        def tokens(t, cell):  # (side*side, C) tokens of one region, row-major
            i, j = cell
            return t[0, i * side:(i + 1) * side, j * side:(j + 1) * side].reshape(side * side, -1)

        for cell in cells:
            region_q = tokens(q, cell)
            scores = torch.stack([region_q.mean(0) @ tokens(k, other).mean(0) for other in cells]) * dim ** -0.5
            chosen = [cells[r] for r in scores.topk(topk).indices.tolist()]
            keys = torch.cat([tokens(k, c) for c in chosen])
            values = torch.cat([tokens(v, c) for c in chosen])
            head_outputs = []
            for h in range(heads):
                sl = slice(h * dim // heads, (h + 1) * dim // heads)
                w = torch.softmax(region_q[:, sl] @ keys[:, sl].T * dim ** -0.5, dim=-1)
                head_outputs.append(w @ values[:, sl])
            i, j = cell
            expected[0, i * side:(i + 1) * side, j * side:(j + 1) * side] = \
                torch.cat(head_outputs, dim=-1).reshape(side, side, dim)
        expected = (expected + _lce(attn, v)) @ attn.wo.weight.T + attn.wo.bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_routing_backward_and_topk_validation():
    """Gradients flow through token attention (the routing indices carry none); a bad top-k is refused."""
    torch.manual_seed(2)
    attn = BiLevelRoutingAttention(8, num_heads=2, num_regions=2, topk=1, lce_kernel_size=0)
    x = torch.randn(1, 4, 4, 8, requires_grad=True)
    attn(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="topk"):
        BiLevelRoutingAttention(8, num_heads=2, num_regions=2, topk=5)(x)


def _tiny_biformer(**kwargs) -> BiFormer:
    return BiFormer(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), head_dim=16, num_classes=5, **kwargs)


@pytest.mark.parametrize("size", [(64, 64), (72, 100)])
def test_forward_backward_two_resolutions(size):
    torch.manual_seed(3)
    model = _tiny_biformer()
    x = torch.randn(2, 3, *size)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    model.eval()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    expected_maps = [(2, 16 * 2 ** i, -(-size[0] // (4 * 2 ** i)), -(-size[1] // (4 * 2 ** i))) for i in range(4)]
    assert [tuple(t.shape) for t in intermediates] == expected_maps


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(4)
    model = _tiny_biformer()
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for ref, param in zip(reference, model.parameters()):
        torch.testing.assert_close(param.grad, ref)


def test_features_only_returns_four_nchw_maps():
    model = timm.create_model("biformer_tiny", features_only=True)
    maps = model(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_reset_classifier_and_pretrained_cfg():
    model = _tiny_biformer()
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7
    with torch.device("meta"):
        built = timm.create_model("biformer_tiny", num_classes=0)
    assert built.pretrained_cfg["input_size"] == (3, 224, 224)
    assert built.pretrained_cfg["classifier"] == "head"


def test_state_dict_round_trip():
    torch.manual_seed(5)
    source = _tiny_biformer().eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = _tiny_biformer().eval()
    target.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("name, official_millions", [
    ("biformer_tiny", 13.14), ("biformer_small", 25.54), ("biformer_base", 56.80)])
def test_parameter_counts_match_official(name, official_millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - official_millions) / official_millions < 0.01, count


def official_biformer_state_dict(depths, dims, num_classes=1000) -> dict:
    """A state dict with the key names and shapes of the official `models/biformer.py` checkpoints, written
    from its key table (not from our model), filled with random values."""
    shapes = {}

    def conv(prefix, out_chs, in_chs, kernel):
        shapes[f"{prefix}.weight"] = (out_chs, in_chs, kernel, kernel)
        shapes[f"{prefix}.bias"] = (out_chs,)

    def linear(prefix, out_f, in_f, bias=True):
        shapes[f"{prefix}.weight"] = (out_f, in_f)
        if bias:
            shapes[f"{prefix}.bias"] = (out_f,)

    def batch_norm(prefix, chs):
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{field}"] = (chs,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    conv("downsample_layers.0.0", dims[0] // 2, 3, 3)
    batch_norm("downsample_layers.0.1", dims[0] // 2)
    conv("downsample_layers.0.3", dims[0], dims[0] // 2, 3)
    batch_norm("downsample_layers.0.4", dims[0])
    for i in range(1, 4):
        conv(f"downsample_layers.{i}.0", dims[i], dims[i - 1], 3)
        batch_norm(f"downsample_layers.{i}.1", dims[i])
    for stage, (depth, dim) in enumerate(zip(depths, dims)):
        for j in range(depth):
            block = f"stages.{stage}.{j}"
            conv(f"{block}.pos_embed", dim, 1, 3)
            for norm in ("norm1", "norm2"):
                shapes[f"{block}.{norm}.weight"] = shapes[f"{block}.{norm}.bias"] = (dim,)
            if stage < 3:
                linear(f"{block}.attn.qkv.qkv", 3 * dim, dim)
                linear(f"{block}.attn.wo", dim, dim)
            else:
                linear(f"{block}.attn.qkv", 3 * dim, dim, bias=False)
                linear(f"{block}.attn.proj", dim, dim)
            conv(f"{block}.attn.lepe", dim, 1, 5)
            linear(f"{block}.mlp.0", 3 * dim, dim)
            linear(f"{block}.mlp.3", dim, 3 * dim)
    batch_norm("norm", dims[-1])
    linear("head", num_classes, dims[-1])
    generator = torch.Generator().manual_seed(0)
    return {key: (torch.tensor(7) if shape == () else torch.randn(shape, generator=generator))
            for key, shape in shapes.items()}


def test_official_key_layout_loads_with_weights_only(tmp_path):
    official = official_biformer_state_dict((2, 2, 8, 2), (64, 128, 256, 512))
    path = tmp_path / "biformer_tiny_official.pth"
    torch.save({"model": official}, path)  # upstream files wrap the state dict as {"model": ...}

    model = timm.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded = model.state_dict()
    assert set(loaded) == set(official)  # strict load: no missing, no unexpected keys
    for key, value in official.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)

    # A new head size drops the classifier, keeps the rest.
    adapted = timm.create_model("biformer_tiny", pretrained=True, num_classes=3,
                                pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(adapted.state_dict()["norm.running_var"], official["norm.running_var"])
    assert adapted.head.out_features == 3

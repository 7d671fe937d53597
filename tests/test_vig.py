"""ViG (gated linear attention) as timm models: official semantics, key layout, timm API, parameter counts."""
import pytest
import timm
import torch
import torch.nn.functional as F

import vision_backbones.vig  # noqa: F401  (registers the models)
from vision_backbones.ops.gla import gated_linear_attention_reference
from vision_backbones.vig import ViG, ViGAttention, checkpoint_filter_fn

TINY = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5, act_in_conv=True,
            out_act=True)


def tiny_vig(**kwargs):
    torch.manual_seed(0)
    return ViG(**{**TINY, **kwargs})


def official_state_dict(dim=32, depth=2, grid=2, num_classes=5, seed=0):
    """A state dict in the official hustvl/ViG key layout, built from the documented key patterns."""
    g = torch.Generator().manual_seed(seed)
    key_dim, head_v = dim // 2, dim // TINY["num_heads"]
    hidden = 256 * -(-int(dim * 8 / 3) // 256)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "pos_embed": rnd(1, grid * grid, dim),
        "patch_embed.proj.0.weight": rnd(dim // 2, 3, 9, 9, scale=0.05), "patch_embed.proj.0.bias": rnd(dim // 2),
        "patch_embed.proj.1.weight": 1 + rnd(dim // 2), "patch_embed.proj.1.bias": rnd(dim // 2),
        "patch_embed.proj.3.weight": rnd(dim, dim // 2, 3, 3, scale=0.1), "patch_embed.proj.3.bias": rnd(dim),
        "patch_embed.proj.4.weight": 1 + rnd(dim), "patch_embed.proj.4.bias": rnd(dim),
        "norm.weight": 1 + rnd(dim), "head.weight": rnd(num_classes, dim), "head.bias": rnd(num_classes),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "attn_norm.weight": 1 + rnd(dim), p + "mlp_norm.weight": 1 + rnd(dim),
            p + "attn.in_proj.0.weight": rnd(dim, 1, 3, 3, scale=0.3),
            p + "attn.qkv_proj.weight": rnd(2 * key_dim + dim, dim, scale=0.5),
            p + "attn.gk_proj.0.weight": rnd(16, dim, scale=0.5),
            p + "attn.gk_proj.1.weight": rnd(2 * key_dim, 16, scale=0.5),
            p + "attn.gk_proj.1.bias": rnd(2 * key_dim, scale=1.0),
            p + "attn.g_proj.weight": rnd(dim, dim), p + "attn.g_proj.bias": rnd(dim),
            p + "attn.g_norm.weight": 1 + rnd(head_v), p + "attn.l_norm.weight": 1 + rnd(head_v),
            p + "attn.o_proj.weight": rnd(dim, dim),
            p + "mlp.gate_proj.weight": rnd(2 * hidden, dim), p + "mlp.down_proj.weight": rnd(dim, hidden),
        })
    return sd


def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer_norm_2d(x, weight, bias):
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], weight, bias, 1e-5).permute(0, 3, 1, 2)


def official_forward(sd, images, depth=2, heads=2):
    """ViG-T's forward transcribed from classification/models/vig.py (training path, flip trick), in fp64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.0.weight"], sd["patch_embed.proj.0.bias"], stride=8, padding=1)
    x = F.silu(layer_norm_2d(x, sd["patch_embed.proj.1.weight"], sd["patch_embed.proj.1.bias"]))
    x = F.conv2d(x, sd["patch_embed.proj.3.weight"], sd["patch_embed.proj.3.bias"], stride=2, padding=1)
    x = layer_norm_2d(x, sd["patch_embed.proj.4.weight"], sd["patch_embed.proj.4.bias"])
    batch, dim, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    key_dim, length = dim // 2, gh * gw

    def heads_first(t):  # 'b n (h d) -> b h n d'
        return t.reshape(batch, length, heads, -1).transpose(1, 2)

    for i in range(depth):
        p = f"blocks.{i}."
        residual = x
        h = rms(x, sd[p + "attn_norm.weight"])
        local = F.silu(F.conv2d(h.transpose(1, 2).reshape(batch, dim, gh, gw), sd[p + "attn.in_proj.0.weight"],
                                padding=1, groups=dim)).flatten(2).transpose(1, 2)
        q, k, v = torch.split(local @ sd[p + "attn.qkv_proj.weight"].T, [key_dim, key_dim, dim], dim=2)
        gk = (local @ sd[p + "attn.gk_proj.0.weight"].T) @ sd[p + "attn.gk_proj.1.weight"].T \
            + sd[p + "attn.gk_proj.1.bias"]
        fw_gk, bw_gk = gk.chunk(2, dim=2)
        gk = F.logsigmoid(torch.cat([heads_first(fw_gk), heads_first(bw_gk.flip(1))])) / 16
        q, k, v = (torch.cat([heads_first(t), heads_first(t).flip(2)]) for t in (q, k, v))
        o, _ = gated_linear_attention_reference(q, k, v, gk)
        o_f, o_b = o.chunk(2)
        o = ((o_f + o_b.flip(2)) / 2).transpose(1, 2)  # b l h d
        local_heads = rms(local.reshape(batch, length, heads, -1), sd[p + "attn.l_norm.weight"])
        o = rms(o, sd[p + "attn.g_norm.weight"])
        gate = torch.sigmoid(local @ sd[p + "attn.g_proj.weight"].T + sd[p + "attn.g_proj.bias"])
        o = o * gate.reshape(batch, length, heads, -1) + local_heads * (1 - gate.reshape(batch, length, heads, -1))
        o = F.silu(o.reshape(batch, length, dim)) @ sd[p + "attn.o_proj.weight"].T
        x = residual + o
        gate_value = rms(x, sd[p + "mlp_norm.weight"]) @ sd[p + "mlp.gate_proj.weight"].T
        gate_half, value = gate_value.chunk(2, dim=-1)
        x = x + (F.silu(gate_half) * value) @ sd[p + "mlp.down_proj.weight"].T
    pooled = rms(x, sd["norm.weight"]).mean(1)
    return pooled @ sd["head.weight"].T + sd["head.bias"]


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.abs().max()).item()


def test_official_key_layout_loads_exactly_and_matches_official_semantics():
    sd = official_state_dict()
    model = tiny_vig().eval()
    missing, unexpected = model.load_state_dict(checkpoint_filter_fn({"model": sd}, model), strict=True)
    assert not missing and not unexpected
    assert set(model.state_dict()) == set(sd)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(model(images), official_forward(sd, images)) < 1e-4


def test_pretrained_file_through_timm(tmp_path):
    sd = official_state_dict()
    path = tmp_path / "vig_t_77p2acc.pth"
    torch.save(sd, path)  # official ViG files hold the bare state dict
    overlay = dict(file=str(path), num_classes=TINY["num_classes"])
    model = timm.create_model("vig_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **TINY).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(images), official_forward(sd, images)) < 1e-4


def test_official_inference_scale_halves_the_scan_output_before_g_norm():
    """The official inference path feeds g_norm (o_f + o_b) / 4, the training path (o_f + o_b) / 2. By hand:
    RMSNorm(o / 2; eps) = o / sqrt(mean(o^2) / 4 + eps) * w = RMSNorm(o; 4 eps). Only eps tells them apart, so the
    scan output is made small (v scaled down) for the difference to show."""
    torch.manual_seed(0)
    training = ViGAttention(dim=32, num_heads=2, norm_eps=1e-3)
    with torch.no_grad():
        training.qkv_proj.weight[-32:] *= 1e-2  # the value rows: a scan output of the order of sqrt(eps)
    official = ViGAttention(dim=32, num_heads=2, norm_eps=1e-3, gla_output_scale=0.5)
    official.load_state_dict(training.state_dict())
    by_hand = ViGAttention(dim=32, num_heads=2, norm_eps=1e-3)
    by_hand.load_state_dict(training.state_dict())
    by_hand.g_norm.eps = 4e-3
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(official(x, (4, 4)), by_hand(x, (4, 4)), rtol=1e-5, atol=1e-6)
        assert (official(x, (4, 4)) - training(x, (4, 4))).abs().max() > 1e-3
    model = timm.create_model("vig_tiny_patch16_224", gla_output_scale=0.5, **TINY)
    assert all(block.attn.gla_output_scale == 0.5 for block in model.blocks)


def test_pos_embed_resize_matches_runtime_resize():
    sd = official_state_dict()
    big = tiny_vig(img_size=64)  # 4x4 grid
    filtered = checkpoint_filter_fn(sd, big)
    assert filtered["pos_embed"].shape == (1, 16, 32)
    big.load_state_dict(filtered)
    small = tiny_vig()
    small.load_state_dict(checkpoint_filter_fn(sd, small))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(images), big.eval()(images))


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_forward_backward_two_resolutions(size):
    model = tiny_vig(drop_path_rate=0.1).train()
    logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 5)
    logits.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_grad_checkpointing_gives_same_gradients():
    images = torch.randn(1, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model = tiny_vig()
        model.set_grad_checkpointing(enable)
        model(images).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_forward_intermediates_and_features_only():
    model = tiny_vig().eval()
    images = torch.randn(2, 3, 64, 48)  # 4x3 grid
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        assert [m.shape for m in maps] == [(2, 32, 4, 3)] * 2
        torch.testing.assert_close(final, model.forward_features(images))
        normed = model.forward_intermediates(images, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(normed[0], final)
    features = timm.create_model("vig_tiny_patch16_224", features_only=True, out_indices=(0, 1), **TINY)
    assert features.feature_info.channels() == [32, 32] and features.feature_info.reduction() == [16, 16]
    assert [o.shape for o in features(torch.randn(1, 3, 48, 64))] == [(1, 32, 3, 4)] * 2


def test_state_dict_round_trip_and_classifier_api():
    model = tiny_vig().eval()
    torch.manual_seed(5)
    clone = ViG(**TINY)
    clone.load_state_dict(model.state_dict())
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(images), model(images))
        clone.reset_classifier(0)
        torch.testing.assert_close(clone(images), model.forward_features(images).mean(1))
    assert clone.num_classes == 0


@pytest.mark.parametrize("name,official", [("vig_tiny_patch16_224", 5.83e6), ("vig_small_patch16_224", 22.62e6),
                                           ("vig_base_patch16_224", 89.02e6)])
def test_parameter_counts(name, official):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - official) / official < 0.01, count

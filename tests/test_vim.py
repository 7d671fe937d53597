"""Vim (Vision Mamba) as timm models: official semantics, key layout, timm API, parameter counts."""
import argparse
import math
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

import vision_backbones.vim  # noqa: F401  (registers the models)
from vision_backbones.ops.selective_scan import selective_scan_reference
from vision_backbones.vim import Vim, checkpoint_filter_fn

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, d_state=4, num_classes=5)


def tiny_vim(**kwargs):
    torch.manual_seed(0)
    return Vim(**{**TINY, **kwargs})


def official_state_dict(dim=32, depth=2, d_state=4, patch=8, grid=4, num_classes=5, seed=0):
    """A state dict in the official hustvl/Vim key layout, built from the documented key patterns."""
    g = torch.Generator().manual_seed(seed)
    inner, rank = 2 * dim, math.ceil(dim / 16)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "cls_token": rnd(1, 1, dim), "pos_embed": rnd(1, grid * grid + 1, dim),
        "patch_embed.proj.weight": rnd(dim, 3, patch, patch, scale=0.05), "patch_embed.proj.bias": rnd(dim),
        "norm_f.weight": 1 + rnd(dim), "head.weight": rnd(num_classes, dim), "head.bias": rnd(num_classes),
    }
    for i in range(depth):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + rnd(dim)
        sd[p + "mixer.in_proj.weight"] = rnd(2 * inner, dim)
        sd[p + "mixer.out_proj.weight"] = rnd(dim, inner)
        for s in ("", "_b"):
            sd[p + f"mixer.A{s}_log"] = torch.log(torch.rand(inner, d_state, generator=g) * 8 + 0.5)
            sd[p + f"mixer.D{s}"] = rnd(inner, scale=1.0)
            sd[p + f"mixer.conv1d{s}.weight"] = rnd(inner, 1, 4, scale=0.5)
            sd[p + f"mixer.conv1d{s}.bias"] = rnd(inner)
            sd[p + f"mixer.x_proj{s}.weight"] = rnd(rank + 2 * d_state, inner)
            sd[p + f"mixer.dt_proj{s}.weight"] = rnd(inner, rank, scale=0.5)
            sd[p + f"mixer.dt_proj{s}.bias"] = rnd(inner) - 2.0
    return sd


def rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def official_forward(sd, images, depth=2, d_state=4, patch=8):
    """Vim's forward transcribed from models_mamba.py / mamba_inner_fn_no_out_proj (bimamba v2), in fp64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    batch, patches, dim = x.shape
    middle = patches // 2
    x = torch.cat([x[:, :middle], sd["cls_token"].expand(batch, -1, -1), x[:, middle:]], dim=1) + sd["pos_embed"]
    length = x.shape[1]
    inner, rank = 2 * dim, math.ceil(dim / 16)
    hidden, residual = x, None
    for i in range(depth):
        p = f"layers.{i}.mixer."
        residual = hidden if residual is None else residual + hidden
        h = rms(residual, sd[f"layers.{i}.norm.weight"])
        xz = (h @ sd[p + "in_proj.weight"].T).transpose(1, 2)
        outs = []
        for s, seq in (("", xz), ("_b", xz.flip(-1))):
            u, z = seq.chunk(2, dim=1)
            u = F.conv1d(u, sd[p + f"conv1d{s}.weight"], sd[p + f"conv1d{s}.bias"], padding=3, groups=inner)
            u = F.silu(u[..., :length])
            x_dbl = torch.einsum("ce,bel->bcl", sd[p + f"x_proj{s}.weight"], u)
            dt = torch.einsum("er,brl->bel", sd[p + f"dt_proj{s}.weight"], x_dbl[:, :rank])
            outs.append(selective_scan_reference(
                u, dt, -torch.exp(sd[p + f"A{s}_log"]), x_dbl[:, rank:rank + d_state], x_dbl[:, rank + d_state:],
                sd[p + f"D{s}"], z, sd[p + f"dt_proj{s}.bias"], delta_softplus=True))
        hidden = ((outs[0] + outs[1].flip(-1)) / 2).transpose(1, 2) @ sd[p + "out_proj.weight"].T
    features = rms(residual + hidden, sd["norm_f.weight"])
    return features[:, middle] @ sd["head.weight"].T + sd["head.bias"]


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.abs().max()).item()


def test_official_key_layout_loads_exactly_and_matches_official_semantics():
    sd = official_state_dict()
    model = tiny_vim().eval()
    missing, unexpected = model.load_state_dict(checkpoint_filter_fn({"model": sd, "epoch": 3}, model), strict=True)
    assert not missing and not unexpected
    assert set(model.state_dict()) == set(sd)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = official_forward(sd, images)
    for backend in ("torch", "auto"):  # chunked PyTorch scan and (under no_grad) the numba path
        for layer in model.layers:
            layer.mixer.scan_backend = backend
        with torch.no_grad():
            assert relative_error(model(images), expected) < 1e-4, backend


def test_pretrained_file_through_timm_with_namespace_pickle(tmp_path):
    sd = official_state_dict()
    path = tmp_path / "vim_t_midclstok.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": 299}, path)
    # num_classes in the overlay: timm drops a checkpoint's head when it disagrees with the cfg's 1000 classes.
    overlay = dict(file=str(path), num_classes=TINY["num_classes"])
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **TINY).eval()
    torch.testing.assert_close(model.pos_embed.data, sd["pos_embed"])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(model(images), official_forward(sd, images)) < 1e-4


class NotAllowed:  # an arbitrary pickled object that weights_only loading must refuse
    pass


def test_unsafe_pickle_refused_with_conversion_hint(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"model": {}, "extra": NotAllowed()}, path)
    with pytest.raises(pickle.UnpicklingError, match="convert it once"):
        timm.create_model("vim_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY)


def test_pos_embed_resampled_around_middle_token():
    sd = official_state_dict()
    model = tiny_vim(img_size=48)  # 6x6 grid: 36 patches, class token at 18
    filtered = checkpoint_filter_fn(sd, model)
    assert filtered["pos_embed"].shape == (1, 37, 32)
    torch.testing.assert_close(filtered["pos_embed"][:, 18], sd["pos_embed"][:, 8])
    model.load_state_dict(filtered)
    # Runtime resampling for a new input size gives the same embeddings as resampling the checkpoint.
    small = tiny_vim()
    small.load_state_dict(checkpoint_filter_fn(sd, small))
    torch.testing.assert_close(small._pos_embed_for((6, 6)), filtered["pos_embed"])


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_forward_backward_two_resolutions(size):
    model = tiny_vim(drop_path_rate=0.1).train()
    images = torch.randn(2, 3, *size)
    logits = model(images)
    assert logits.shape == (2, 5)
    logits.square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.layers[1].mixer.A_b_log.grad.abs().sum() > 0  # the backward branch is used


def test_grad_checkpointing_gives_same_gradients():
    images = torch.randn(1, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model = tiny_vim()
        model.set_grad_checkpointing(enable)
        model(images).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_forward_intermediates_and_features_only():
    model = tiny_vim().eval()
    images = torch.randn(2, 3, 48, 32)  # 6x4 grid
    with torch.no_grad():
        final, maps = model.forward_intermediates(images, indices=[0, 1])
        assert [m.shape for m in maps] == [(2, 32, 6, 4)] * 2
        torch.testing.assert_close(final, model.forward_features(images))
        tokens = model.forward_intermediates(images, indices=1, output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)
        (patch_tokens, cls_token), = tokens
        assert patch_tokens.shape == (2, 24, 32) and cls_token.shape == (2, 1, 32)
        # The last block's stream, normalised, is the final feature sequence: class token first, then the patches.
        (patches, cls), = model.forward_intermediates(images, indices=1, norm=True, output_fmt="NLC",
                                                      intermediates_only=True, return_prefix_tokens=True)
        torch.testing.assert_close(cls, final[:, :1])
        torch.testing.assert_close(patches, final[:, 1:])

    features = timm.create_model("vim_tiny_patch16_224", features_only=True, out_indices=(0, 1), **TINY)
    assert features.feature_info.channels() == [32, 32] and features.feature_info.reduction() == [8, 8]
    outs = features(torch.randn(1, 3, 40, 32))
    assert [o.shape for o in outs] == [(1, 32, 5, 4)] * 2


def test_state_dict_round_trip_and_classifier_api():
    model = tiny_vim().eval()
    clone = tiny_vim(global_pool="token")
    torch.manual_seed(5)
    clone.load_state_dict(model.state_dict())
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(images), model(images))
        clone.reset_classifier(0, "avg")
        pooled = clone(images)
        tokens = model.forward_features(images)
        torch.testing.assert_close(pooled, tokens[:, 1:].mean(1))
    assert clone.get_classifier().__class__.__name__ == "Identity" and clone.num_classes == 0


@pytest.mark.parametrize("name,official", [("vim_tiny_patch16_224", 7.15e6), ("vim_small_patch16_224", 25.80e6),
                                           ("vim_base_patch16_224", 97.60e6)])
def test_parameter_counts(name, official):
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - official) / official < 0.01, count


def test_overlapping_patches_stride8_variant():
    with torch.device("meta"):
        model = timm.create_model("vim_tiny_patch16_stride8_224")
    assert model.grid_size == (27, 27) and model.pos_embed.shape == (1, 730, 192)
    small = tiny_vim(stride=4)  # 8x8 patches at stride 4 on 32x32: a 7x7 grid
    with torch.no_grad():
        assert small.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 50, 32)

"""LookupViT: the bidirectional cross-attention against a per-token reference, runtime compressed grids, timm API."""

import io

import pytest
import timm
import torch

from vision_backbones.lookupvit import BidirectionalCrossAttention, LookupViT, checkpoint_filter_fn




def _tiny_lookupvit(**kwargs) -> LookupViT:
    args = dict(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, compressed_grid=2, num_classes=5)
    return LookupViT(**dict(args, **kwargs))


def test_cross_attention_reuses_similarity_normalised_over_compressed_tokens():
    torch.manual_seed(0)
    dim, heads, num_compressed, num_lookup = 8, 2, 3, 5
    mhbc = BidirectionalCrossAttention(dim, heads)
    compressed, lookup = torch.randn(1, num_compressed, dim), torch.randn(1, num_lookup, dim)
    with torch.no_grad():
        update_compressed, logits = mhbc.gather(compressed, lookup)
        new_compressed = torch.randn(1, num_compressed, dim)
        update_lookup = mhbc.scatter(new_compressed, logits)

        # Per-token reference, one head at a time.
        head_dim = dim // heads
        q = compressed[0] @ mhbc.q.weight.T + mhbc.q.bias
        k, v = (lookup[0] @ mhbc.kv.weight.T + mhbc.kv.bias).split(dim, dim=-1)
        v_back = new_compressed[0] @ mhbc.v_back.weight.T + mhbc.v_back.bias
        gathered, scattered = torch.zeros(num_compressed, dim), torch.zeros(num_lookup, dim)
        for h in range(heads):
            sl = slice(h * head_dim, (h + 1) * head_dim)
            sim = q[:, sl] @ k[:, sl].T * head_dim ** -0.5  # (M, N)
            torch.testing.assert_close(logits[0, h], sim)
            for m in range(num_compressed):  # compressed token m: softmax over the lookup tokens
                gathered[m, sl] = torch.softmax(sim[m], dim=0) @ v[:, sl]
            for n in range(num_lookup):  # lookup token n: softmax over the compressed tokens
                scattered[n, sl] = torch.softmax(sim[:, n], dim=0) @ v_back[:, sl]
        expected_compressed = gathered @ mhbc.proj.weight.T + mhbc.proj.bias
        expected_lookup = scattered @ mhbc.proj_back.weight.T + mhbc.proj_back.bias
    torch.testing.assert_close(update_compressed[0], expected_compressed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(update_lookup[0], expected_lookup, atol=1e-5, rtol=1e-5)


def test_compressed_tokens_are_resized_lookup_tokens():
    torch.manual_seed(1)
    model = _tiny_lookupvit().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        same_size, lookup, grid = model._embed(x, (4, 4))  # 4x4 lookup grid: identity resize
        pooled, _, _ = model._embed(x, (1, 1))             # antialiased 4 -> 1: a triangle filter of width 4
    assert grid == (4, 4)
    torch.testing.assert_close(same_size, lookup)
    # Tokens sit 1.5 and 0.5 cells from the centre: weights 1 - d/4 = 0.625, 0.875 (normalised) on each axis.
    axis = torch.tensor([0.625, 0.875, 0.875, 0.625]) / 3.0
    weights = (axis[:, None] * axis[None, :]).reshape(16, 1)
    torch.testing.assert_close(pooled[:, 0], (lookup * weights).sum(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (80, 100)])
def test_forward_backward_two_resolutions(size):
    torch.manual_seed(2)
    model = _tiny_lookupvit()
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
    grid = (-(-size[0] // 16), -(-size[1] // 16))  # inputs are padded up to the patch size
    assert [tuple(t.shape) for t in intermediates] == [(2, 32, *grid)] * 2


def test_compressed_grid_is_chosen_at_inference_with_the_same_parameters():
    torch.manual_seed(3)
    model = _tiny_lookupvit().eval()
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out_2 = model(x)
        out_3 = model(x, compressed_grid=3)
        model.set_compressed_grid(3)
        out_3_set = model(x)
        out_1x2 = model(x, compressed_grid=(1, 2))
    assert not torch.allclose(out_2, out_3, atol=1e-4)
    assert not torch.allclose(out_2, out_1x2, atol=1e-4)
    torch.testing.assert_close(out_3_set, out_3)
    assert model.state_dict().keys() == params_before.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, params_before[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="positive"):
        model.set_compressed_grid(0)


def test_multi_resolution_training_samples_grids():
    torch.manual_seed(4)
    model = _tiny_lookupvit(train_grid_sizes=(1, 3)).train()
    seen = set()
    model.blocks[0].register_forward_hook(lambda module, args, out: seen.add(args[0].shape[1]))
    for _ in range(12):
        model(torch.randn(1, 3, 64, 64))
    assert seen == {1, 9}
    model.eval()
    seen.clear()
    model(torch.randn(1, 3, 64, 64))
    assert seen == {4}  # eval uses the configured default grid (2x2)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(5)
    model = _tiny_lookupvit()
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for ref, param in zip(reference, model.parameters()):
        torch.testing.assert_close(param.grad, ref)


def test_features_only_and_reset_classifier():
    model = timm.create_model("lookupvit_tiny_patch16_224", features_only=True, img_size=64)
    maps = model(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 4, 4)] * 3  # the last 3 blocks, as timm's ViT
    head_model = _tiny_lookupvit()
    head_model.reset_classifier(0)
    assert head_model(torch.randn(1, 3, 64, 64)).shape == (1, 32)


def test_state_dict_round_trip_and_pos_embed_resampling():
    torch.manual_seed(6)
    source = _tiny_lookupvit().eval()
    buffer = io.BytesIO()
    torch.save({"model": source.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    same = _tiny_lookupvit().eval()
    same.load_state_dict(checkpoint_filter_fn(checkpoint, same))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same(x), source(x), rtol=0, atol=0)
    bigger = _tiny_lookupvit(img_size=96).eval()
    bigger.load_state_dict(checkpoint_filter_fn(checkpoint, bigger))  # strict: keys match, pos_embed resampled
    assert bigger.pos_embed.shape == (1, 36, 32)


def _expected_parameters(dim: int, depth: int = 12, patch: int = 16, num_patches: int = 196) -> int:
    """Our configuration, counted by hand: a timm ViT block on the compressed tokens (12 D^2 + 13 D), the
    cross-attention q, kv, proj, v_back, proj_back (6 D^2 + 6 D), four extra LayerNorms (8 D) and the
    lookup MLP with hidden D/2 (D^2 + 1.5 D)."""
    per_block = 19 * dim * dim + 28.5 * dim
    stem = 3 * patch * patch * dim + dim + num_patches * dim
    return int(depth * per_block + stem + 2 * dim + 1000 * dim + 1000)


@pytest.mark.parametrize("size, vit", [("tiny", "vit_tiny_patch16_224"), ("small", "vit_small_patch16_224"),
                                       ("base", "vit_base_patch16_224")])
def test_parameter_counts_and_vit_widths(size, vit):
    with torch.device("meta"):
        model = timm.create_model(f"lookupvit_{size}_patch16_224")
        reference = timm.create_model(vit)
    assert model.embed_dim == reference.embed_dim
    assert len(model.blocks) == len(reference.blocks)
    assert model.blocks[0].cross_attn.num_heads == reference.blocks[0].attn.num_heads
    assert sum(p.numel() for p in model.parameters()) == _expected_parameters(model.embed_dim)


def test_key_layout_is_stable():
    """The suite defines LookupViT's checkpoint layout (no official one exists): renaming a module breaks it."""
    keys = set(_tiny_lookupvit(depth=1).state_dict())
    block = {f"blocks.0.{name}.{p}" for name in (
        "norm_compressed", "norm_lookup", "cross_attn.q", "cross_attn.kv", "cross_attn.proj", "cross_attn.v_back",
        "cross_attn.proj_back", "compressed_block.norm1", "compressed_block.attn.qkv", "compressed_block.attn.proj",
        "compressed_block.norm2", "compressed_block.mlp.fc1", "compressed_block.mlp.fc2", "norm_back",
        "norm_lookup_mlp", "lookup_mlp.fc1", "lookup_mlp.fc2") for p in ("weight", "bias")}
    top = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
           "head.weight", "head.bias"}
    assert keys == block | top

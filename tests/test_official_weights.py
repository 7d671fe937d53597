"""Official training checkpoints hold `model` and `model_ema`: every way of loading our families picks the same set.

The official evaluation scripts load `model`; timm's generic file reader prefers `model_ema`. Our families read every
source themselves (`load_pretrained`), so a file, an in-memory state dict, the Hub and the VLM's vision tower all
give `model`, and an `ema` tag gives the moving average."""

import argparse

import pytest
import timm
import torch

import vision_backbones  # noqa: F401  (registers the families)
from vlm.vision import VisionTower

# name -> constructor kwargs: each family's registered tiny variant, and Vim-Ti with fewer layers for its Hub file
FAMILIES = {"test_vim": {}, "test_vig": {}, "test_biformer": {}, "test_lookupvit": {},
            "vim_tiny_patch16_224": dict(img_size=64, depth=2)}


def training_checkpoint(name, path, kwargs):
    """Save `{"model": raw, "model_ema": raw + 1, "args": Namespace}` as the official training scripts do."""
    torch.manual_seed(0)
    raw = timm.create_model(name, **kwargs).state_dict()
    ema = {key: value + 1 if value.is_floating_point() else value for key, value in raw.items()}
    torch.save({"model": raw, "model_ema": ema, "args": argparse.Namespace(lr=1e-3), "epoch": 299}, path)
    return raw, ema


def assert_holds(model, weights, skip_head=False):
    state = model.state_dict()
    for key, value in weights.items():
        if skip_head and key.startswith("head."):
            continue
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name", list(FAMILIES))
def test_file_loads_model_weights_and_ema_tag_the_average(name, tmp_path):
    kwargs = FAMILIES[name]
    path = tmp_path / "checkpoint.pth"
    raw, ema = training_checkpoint(name, path, kwargs)
    plain = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert_holds(plain, raw)
    averaged = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), tag="in1k_ema"),
                                 **kwargs)
    assert_holds(averaged, ema)
    headless = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)),
                                 **kwargs)
    assert_holds(headless, raw, skip_head=True)


def test_every_source_picks_the_same_weights(tmp_path, monkeypatch):
    name, kwargs = "vim_tiny_patch16_224", FAMILIES["vim_tiny_patch16_224"]
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    raw, ema = training_checkpoint(name, path, kwargs)

    with torch.serialization.safe_globals([argparse.Namespace]):
        in_memory = torch.load(path, weights_only=True)
    assert_holds(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=in_memory),
                                   **kwargs), raw)

    downloads = []

    def hub_download(repo_id, filename, **_):
        downloads.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", hub_download)
    assert_holds(timm.create_model(name, pretrained=True, **kwargs), raw)
    assert_holds(timm.create_model(f"{name}.in1k_ema", pretrained=True, **kwargs), ema)
    assert downloads == [("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")] * 2

    tower = VisionTower(name, model_kwargs=kwargs, pretrained_file=str(path))
    assert_holds(tower.model, raw, skip_head=True)
    tower = VisionTower(f"{name}.in1k_ema", model_kwargs=kwargs, pretrained_file=str(path))
    assert_holds(tower.model, ema, skip_head=True)


def test_missing_weights_are_named(tmp_path):
    name, kwargs = "test_vig", FAMILIES["test_vig"]
    plain_file = tmp_path / "plain.pth"
    torch.save(timm.create_model(name, **kwargs).state_dict(), plain_file)  # a bare state dict: no EMA inside
    with pytest.raises(ValueError, match="without model_ema weights"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(plain_file), tag="in1k_ema"),
                          **kwargs)
    ema_only = tmp_path / "ema_only.pth"
    torch.save({"model_ema": timm.create_model(name, **kwargs).state_dict()}, ema_only)
    with pytest.raises(ValueError, match="holds model_ema but no model weights"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(ema_only)), **kwargs)

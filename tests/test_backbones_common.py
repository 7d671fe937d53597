"""Every backbone the suite offers builds through timm without a head and runs a small forward pass."""

import importlib

import pytest
import timm
import torch




# name -> (module that registers it, or None for timm's own, constructor kwargs for a small input, input side)
BACKBONES = {
    "vit_tiny_patch16_224": (None, dict(img_size=64), 64),
    "davit_tiny": (None, {}, 64),
    "lookupvit_tiny_patch16_224": ("vision_backbones.lookupvit", dict(img_size=64), 64),
    "biformer_tiny": ("vision_backbones.biformer", {}, 64),
    "vim_tiny_patch16_224": ("vision_backbones.vim", dict(img_size=64), 64),
    "vig_tiny_patch16_224": ("vision_backbones.vig", dict(img_size=64), 64),
    # the registered tiny variants the tests and the demo use
    **{f"test_{family}": (f"vision_backbones.{family}", {}, 64) for family in ("lookupvit", "biformer", "vim", "vig")},
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_builds_headless_and_runs(name):
    module, kwargs, side = BACKBONES[name]
    if module is not None:
        try:
            importlib.import_module(module)
        except ImportError as error:
            pytest.skip(f"{module} is not importable yet ({error})")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, **kwargs).eval()
    assert model.pretrained_cfg and model.pretrained_cfg.get("input_size"), f"{name} has no pretrained_cfg"
    with torch.no_grad():
        pooled = model(torch.randn(1, 3, side, side))
        features = model.forward_features(torch.randn(1, 3, side, side))
    assert pooled.shape == (1, model.num_features)
    assert torch.isfinite(pooled).all()
    assert features.ndim in (3, 4)


def test_peak_tensor_memory_probe_counts_live_storages():
    from benchmarks.backbones import PeakTensorMemory

    x = torch.ones(1000)  # created outside the probe: not counted
    with PeakTensorMemory() as probe:
        a = x * 2            # +4000 bytes
        b = a + 1            # +4000 -> 8000 live
        view = b.view(10, 100)  # a view shares b's storage: not counted again
        b.add_(1)            # in place: not counted again
        del a                # -4000
        c = view * 3         # +4000 -> 8000 live again, peak stays 8000
        del b, view, c
    assert probe.peak == 8000
    assert probe.current == 0

"""LookupViT's compressed-token grid as an inference option of the VLM: per model, in the config, on the command
line; the same as a tower built with that grid, kept by save/reload, recorded in the evaluation settings."""

import json

import pytest
import torch
from PIL import Image

from data.scenes import SceneConfig, generate_scenes
from eval import cli as eval_cli
from vlm import VisionLanguageModel
from vlm.cli import main
from vlm.prompts import SHORT_CAPTION_PROMPT
from vlm.testing import save_tiny_hf_vlm, tiny_vlm

# untrained tiny models write control characters, which the example plots cannot draw
pytestmark = pytest.mark.filterwarnings("ignore:Glyph .* missing from font")


def lookup_vlm(**vision_kwargs):
    """A tiny VLM on `test_lookupvit` at 32 px: 4x4 lookup tokens; its default compressed grid is 5x5."""
    return tiny_vlm(vision="test_lookupvit", vision_kwargs={"img_size": 32, **vision_kwargs}, image_size=32, seed=5)


def features(model, pixels):
    with torch.no_grad():
        return model.get_image_features(pixels)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_grid_changes_the_features_but_not_the_weights_or_the_token_count(pixels):
    model, _ = lookup_vlm()
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    default = features(model, pixels)
    for grid in (1, 2, (2, 3), 7):
        model.set_compressed_grid(grid)
        # the tower outputs its lookup tokens, one per patch, whatever the grid: the prompt layout stays valid
        assert features(model, pixels).shape == default.shape
        assert model.vision_tower(pixels).shape[1] == model.config.vision_num_tokens == 16
    model.set_compressed_grid(2)
    assert not torch.allclose(features(model, pixels), default, atol=1e-4)
    model.set_compressed_grid(5)
    torch.testing.assert_close(features(model, pixels), default, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_set_grid_equals_building_the_tower_with_it(pixels):
    model, _ = lookup_vlm()
    model.set_compressed_grid(2)
    built, _ = lookup_vlm(compressed_grid=2)  # the timm kwarg, through VLMConfig.vision_kwargs
    built.load_state_dict(model.state_dict())
    assert built.vision_tower.compressed_grid == model.vision_tower.compressed_grid == (2, 2)
    torch.testing.assert_close(features(built, pixels), features(model, pixels), rtol=0, atol=0)


@pytest.mark.parametrize("grid", [3, (2, 3)])
def test_save_and_reload_keep_the_grid_and_the_weights(tmp_path, pixels, grid):
    model, _ = lookup_vlm()
    model.save_pretrained(tmp_path / "before")
    model.set_compressed_grid(grid)
    model.save_pretrained(tmp_path / "after")
    saved = json.loads((tmp_path / "after" / "config.json").read_text())
    assert saved["vision_kwargs"] == {"img_size": 32, "compressed_grid": list(grid) if isinstance(grid, tuple) else grid}
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "after").eval()
    assert reloaded.vision_tower.compressed_grid == ((grid, grid) if isinstance(grid, int) else grid)
    torch.testing.assert_close(features(reloaded, pixels), features(model, pixels), rtol=0, atol=0)
    before = VisionLanguageModel.from_pretrained(tmp_path / "before")
    for key, value in before.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_other_towers_are_refused():
    model, _ = tiny_vlm()
    with pytest.raises(ValueError, match="LookupViT option, but the vision tower is vit_tiny_patch16_224"):
        model.set_compressed_grid(3)
    assert "compressed_grid" not in model.config.vision_kwargs
    assert model.vision_tower.compressed_grid is None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny LookupViT VLM, a tiny ViT one, an image and a small scenes folder."""
    root = tmp_path_factory.mktemp("grid")
    for name, (model, processor) in {"lookupvit": lookup_vlm(), "vit": tiny_vlm()}.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(root / "red.png")
    config = SceneConfig(image_size=32, splits={"test": 1.0}, pope_per_image=1, captions_per_image=2)
    generate_scenes(root / "scenes", num_images=3, seed=3, config=config)
    return root


@pytest.fixture
def loaded_models(monkeypatch):
    """The models the CLI loads, as it loads them."""
    models = []

    def load_and_keep(*args):
        model, processor = load_model(*args)
        models.append(model)
        return model, processor

    load_model = eval_cli.load_model
    monkeypatch.setattr(eval_cli, "load_model", load_and_keep)
    return models


def test_ask_and_caption_take_the_grid(saved, loaded_models, capsys):
    common = ["--model", str(saved / "lookupvit"), "--max-new-tokens", "4", "--device", "cpu", "--json"]
    assert main(["ask", str(saved / "red.png"), "What colour is it?", *common, "--compressed-grid", "2"]) == 0
    assert main(["caption", str(saved / "red.png"), *common, "--compressed-grid", "3"]) == 0
    assert main(["caption", str(saved / "red.png"), *common]) == 0
    assert [model.vision_tower.compressed_grid for model in loaded_models] == [(2, 2), (3, 3), (5, 5)]
    answer = json.loads(capsys.readouterr().out.splitlines()[1])["answer"]
    model, processor = lookup_vlm()
    model.set_compressed_grid(3)
    inputs = processor(images=[Image.open(saved / "red.png")], text=[f"<image>\n{SHORT_CAPTION_PROMPT}"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert answer == processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0]


def test_eval_records_the_grid_in_its_settings(saved, tmp_path, capsys):
    base = ["eval", "vqa", "--model", str(saved / "lookupvit"), "--scenes", str(saved / "scenes"), "--out",
            str(tmp_path), "--limit", "2", "--max-new-tokens", "3", "--no-progress"]
    settings = tmp_path / "vqa.answers.jsonl.settings.json"
    assert main([*base, "--compressed-grid", "2"]) == 0
    assert json.loads(settings.read_text())["model"]["compressed_grid"] == [2, 2]
    capsys.readouterr()
    assert main(base) == 2  # the saved grid (5x5) made other answers: not resumed from
    assert "compressed_grid" in capsys.readouterr().err
    assert main([*base, "--compressed-grid", "2"]) == 0  # the same grid resumes
    assert main([*base, "--overwrite"]) == 0
    assert json.loads(settings.read_text())["model"]["compressed_grid"] == [5, 5]


def test_the_cli_refuses_the_grid_for_other_towers(saved, tmp_path, capsys):
    save_tiny_hf_vlm("llava", tmp_path / "llava")
    for folder, reason in [(saved / "vit", "the vision tower is vit_tiny_patch16_224"),
                           (tmp_path / "llava", "holds a LlavaForConditionalGeneration")]:
        assert main(["ask", str(saved / "red.png"), "hi", "--model", str(folder), "--device", "cpu",
                     "--compressed-grid", "2"]) == 2
        assert reason in capsys.readouterr().err

"""Recipes: YAML + dotted overrides into dataclasses, type checks with clear errors, round trips."""

from pathlib import Path

import pytest

from train.config import ConfigError, TrainConfig, load_config, save_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "train" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_round_trips(recipe, tmp_path):
    config = load_config(recipe)
    assert isinstance(config, TrainConfig) and config.data.sources
    assert load_config(save_config(config, tmp_path / "saved.yaml")) == config


def test_overrides_reach_nested_fields_and_list_items(tmp_path):
    recipe = RECIPES[0]
    config = load_config(recipe, ["optim.lr=1e-3", "data.sources.0.weight=2", "stage.name=align",
                                  "lora.target_modules=[q_proj, v_proj]", "optim.vision_lr=null", "batch_size=3"])
    assert config.optim.lr == 0.001 and isinstance(config.optim.lr, float)  # YAML reads 1e-3 as a string
    assert config.data.sources[0].weight == 2.0
    assert config.stage.name == "align" and config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.optim.vision_lr is None and config.batch_size == 3


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("batch_size=2.5", "batch_size: expected an integer"),
    ("logging.progress=maybe", "logging.progress: expected true or false"),
    ("stage.name=pretrain", "stage.name='pretrain' is not one of"),
    ("data.sources.4.weight=1", "not an index of a 2-item list"),
    ("max_steps=0", "max_steps must be at least 1"),
    ("no_equals_sign", "key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(RECIPES[0], [override])


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match=f"{path}.*optim.lr"):
        load_config(path)
    path.write_text("data:\n  sources:\n    - {path: x}\n")
    with pytest.raises(ConfigError, match="required key 'kind'"):
        load_config(path)


def test_command_line_builds_the_config():
    import argparse

    from train.assets import register as register_assets
    from train.cli import register
    from train.config import config_from_args

    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    register(subparsers)
    register_assets(subparsers)
    args = parser.parse_args(["train", "--config", str(RECIPES[0]), "--resume", "optim.lr=2e-3", "max_steps=7"])
    config = config_from_args(args)
    assert config.resume and config.optim.lr == 0.002 and config.max_steps == 7
    assets = parser.parse_args(["assets", "smollm2", "--out", "somewhere"])
    assert assets.out == "somewhere" and callable(assets.func)


def test_shipped_recipes_are_nameable_from_any_folder(tmp_path, monkeypatch):
    from train.config import shipped_recipes

    monkeypatch.chdir(tmp_path)
    assert "demo_tiny" in shipped_recipes()
    assert load_config("demo_tiny") == load_config(RECIPES[[p.stem for p in RECIPES].index("demo_tiny")])
    with pytest.raises(ConfigError, match="demo_tiny"):
        load_config("demo_tinny")  # the refusal lists the shipped names


def test_every_vlm_config_argument_is_settable_from_a_recipe():
    """`model.vlm` goes to `VLMConfig` as it is: options no field of training repeats (freeze_vision,
    vision_keep_prefix_tokens) reach the built model; an unknown key gets a did-you-mean."""
    from train.modelbuild import build_model
    from vlm.testing import TINY_CORPUS
    from vlm.tokenizer import train_tokenizer

    config = load_config(RECIPES[0], [
        "model.vlm.vision_kwargs={img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
        "model.vlm.image_size=32", "model.vlm.freeze_vision=true", "model.vlm.vision_keep_prefix_tokens=true",
        "model.vlm.attention_mode=modality_mutual"])
    model, processor = build_model(config.model, train_tokenizer(TINY_CORPUS, vocab_size=256))
    assert model.config.freeze_vision and model.config.vision_keep_prefix_tokens
    assert model.config.attention_mode == "modality_mutual" and processor.prompts == config.model.prompts
    assert not any(parameter.requires_grad for parameter in model.vision_tower.parameters())
    with pytest.raises(ConfigError, match="unknown key 'model.vlm.visoin'.*did you mean 'vision'"):
        load_config(RECIPES[0], ["model.vlm.visoin=vit_small_patch16_224"])
    with pytest.raises(ConfigError, match="model.vlm.image_token_id"):
        load_config(RECIPES[0], ["model.vlm.image_token_id=3"])  # the tokenizer decides it

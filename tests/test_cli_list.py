"""`vlm --version` and `vlm list backbones|modes|mitigations|recipes`: every entry has a description, listed names
exist."""

import re
from importlib.metadata import version

import pytest
import timm

import vision_backbones  # noqa: F401  (registers our backbones with timm)
from vlm import ATTENTION_MODES
from vlm.cli import main
from vlm.mitigation import METHOD_DEFAULTS


def listed(kind, capsys) -> dict[str, str]:
    assert main(["list", kind]) == 0
    return dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"vlm {version('vlm-suite')}"


def test_modes_and_mitigations_list_every_entry_with_its_options(capsys):
    assert list(listed("modes", capsys)) == list(ATTENTION_MODES)
    methods = listed("mitigations", capsys)
    assert list(methods) == list(METHOD_DEFAULTS)
    assert "alpha=0.2" in methods["pai"] and "noise_step=500" in methods["vcd"]


def test_backbone_names_exist_in_timm(capsys):
    entries = listed("backbones", capsys)
    assert len(entries) == 6
    for line in entries.values():
        pattern = re.search(r"timm names (\S+)", line).group(1)
        stem, sizes, tail = re.match(r"(.*)\{(.*)\}(.*)", pattern).groups()
        for size in sizes.split(","):
            assert timm.is_model(f"{stem}{size}{tail}"), f"{stem}{size}{tail}"


def test_recipes_are_listed_with_their_settings_and_load_by_name(capsys):
    from train.config import load_config, shipped_recipes

    recipes = listed("recipes", capsys)
    assert list(recipes) == shipped_recipes() and "demo_tiny" in recipes
    for name, line in recipes.items():
        config = load_config(name)
        assert f"stage={config.stage.name}" in line and f"max_steps={config.max_steps}" in line
        assert len(line.split(";")[0]) > 20  # the recipe's own first sentence

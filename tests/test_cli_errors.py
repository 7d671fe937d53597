"""A user's error ends every `vlm` command with one line on stderr and exit code 2, before the model is loaded
where it can be; `--debug` shows the traceback instead. Every option's help says what it is and its default."""

import argparse
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import eval.cli
from vlm.cli import DefaultsHelpFormatter, build_parser, main
from vlm.testing import tiny_vlm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny model, an image, and copies of the model whose weights are a pickle or another model's."""
    root = tmp_path_factory.mktemp("errors")
    model, processor = tiny_vlm(seed=3)
    for name in ("model", "pickled", "other"):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    weights = load_file(str(root / "model" / "model.safetensors"))
    for name, state in (("pickled", {**weights, "meta": argparse.Namespace(step=1)}), ("other", {"state": weights})):
        (root / name / "model.safetensors").unlink()
        torch.save(state, root / name / "pytorch_model.bin")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "a.png")
    return root


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def assert_one_line(err: str, *expected: str):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(eval.cli, "load_model", refuse)


@pytest.mark.parametrize("options, expected", [
    (["--mitigation", "pai:alpah=0.3"], ["vlm ask: error:", "'pai': unknown option(s) ['alpah']", "alpha"]),
    (["--mitigation", "vcd,icd"], ["vcd and icd each need the contrast branch"]),
    (["--mitigation", "vcd", "--num-beams", "2"], ["vcd (contrastive decoding) does not support beam search"]),
    (["--mitigation", "pai,paint"], ["pai and paint"]),
    (["--mitigation", "halo"], ["unknown method 'halo'", "vhr"]),
    (["--stream", "--json"], ["--stream"]),
])
def test_option_errors_are_one_line_before_the_model_loads(folder, capsys, no_model_loading, options, expected):
    code, err = run(["ask", "--model", folder / "model", folder / "a.png", "Is it red?", *options], capsys)
    assert code == 2
    assert_one_line(err, *expected)


@pytest.mark.parametrize("argv, expected", [
    (["caption", "--model", "M", "a.png", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["ask", "--model", "M", "a.png", "hi", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be at least 1"),
    (["data", "scenes", "--out", "S", "--images", "-5"], "argument --images: must be at least 1, got -5"),
    (["eval", "pope", "--model", "M", "--out", "O", "--limit", "zero"], "argument --limit: invalid positive_int"),
])
def test_bad_numbers_are_usage_errors(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(folder, capsys):
    code, err = run(["ask", "--model", folder / "model", folder / "a.png", "hi", "--device", "cuda"], capsys)
    assert code == 2
    assert_one_line(err, "--device cuda: no CUDA GPU", "--device cpu")


def test_weights_that_are_a_pickle_or_another_models_are_refused(folder, capsys):
    code, err = run(["ask", "--model", folder / "pickled", folder / "a.png", "hi"], capsys)
    assert code == 2
    assert_one_line(err, str(folder / "pickled"), "argparse.Namespace", "safetensors")
    assert "weights_only" not in err
    code, err = run(["caption", "--model", folder / "other", folder / "a.png"], capsys)
    assert code == 2
    assert_one_line(err, str(folder / "other"), "lack", "tensors")


def test_debug_shows_the_traceback(folder):
    argv = ["ask", "--model", str(folder / "model"), str(folder / "a.png"), "hi", "--mitigation", "vcd,icd"]
    with pytest.raises(ValueError, match="contrast branch"):
        main([*argv, "--debug"])
    with pytest.raises(ValueError, match="contrast branch"):
        main(["--debug", *argv])


def test_data_errors(tmp_path, capsys):
    code, err = run(["data", "scenes", "--out", tmp_path / "s", "--images", "3"], capsys)
    assert code == 2
    assert_one_line(err, "vlm data scenes: error:", "3 images leave the test split(s) empty", "at least 8 images")
    assert not (tmp_path / "s").exists()
    config = tmp_path / "scenes.yaml"
    config.write_text("image_sise: 32\n")
    code, err = run(["data", "scenes", "--out", tmp_path / "s", "--images", "10", "--config", config], capsys)
    assert code == 2
    assert_one_line(err, str(config), "'image_sise'", "did you mean 'image_size'?")
    code, err = run(["data", "pope", "--instances", tmp_path / "nothere.json", "--out", tmp_path / "p"], capsys)
    assert code == 2
    assert_one_line(err, "vlm data pope: error:", f"{tmp_path / 'nothere.json'}: No such file or directory")


@pytest.mark.parametrize("argv, expected", [
    (["--config", "nothere.yaml"], ["nothere.yaml: no such recipe file", "demo_tiny"]),
    (["--config", "demo_tiny", "max_step=3"], ["unknown key 'max_step'", "did you mean 'max_steps'?"]),
    (["--config", "demo_tiny", "optim.lr=abc"], ["optim.lr: expected a number, got 'abc'"]),
    (["--config", "demo_tiny", "data.sources.0.path=/nonexistent"], ["/nonexistent/conversations_train.json is missing"]),
])
def test_train_config_and_data_errors(tmp_path, capsys, argv, expected):
    code, err = run(["train", *argv, f"out_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert_one_line(err, "vlm train: error:", *expected)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bad_questions_file_names_its_line(folder, tmp_path, capsys):
    questions = tmp_path / "pope_random.json"
    good = {"question_id": 1, "image": "a.png", "text": "Is there a dog in the image?", "label": "no"}
    questions.write_text(json.dumps(good) + "\n{not json\n")
    code, err = run(["eval", "pope", "--model", folder / "model", "--out", tmp_path / "out",
                     "--pope-files", questions, "--image-root", folder], capsys)
    assert code == 2
    assert_one_line(err, f"{questions}:2")


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_has_help_and_shows_its_default():
    formatter = DefaultsHelpFormatter("vlm")
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            where = f"{parser.prog} {action.option_strings[0]}"
            assert action.help, f"{where} has no help"
            if action.default not in (None, argparse.SUPPRESS) and action.nargs != 0 and not action.required:
                assert "default" in formatter._get_help_string(action), f"{where} does not show its default"

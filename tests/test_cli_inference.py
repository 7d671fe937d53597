"""`vlm caption` / `vlm ask` and batched inference: batches equal one-by-one decoding, bad inputs are
reported per input while the others complete, streaming prints the same answer."""

import json

import pytest
import torch
from PIL import Image, ImageDraw

from data.images import load_image
from eval.inference import Request, collect_image_paths, generate_answers, load_model
from vlm.cli import main
from vlm.testing import tiny_vlm

MAX_NEW = 6


def draw(colour, shape: str, size=(40, 36)) -> Image.Image:
    image = Image.new("RGB", size, (120, 130, 140))
    box = (6, 6, size[0] - 6, size[1] - 6)
    (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=colour)
    return image


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved with its processor, and a folder of images (one in a sub-folder, one not an image)."""
    folder = tmp_path_factory.mktemp("tiny")
    model, processor = tiny_vlm(seed=7)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    images = folder / "images"
    (images / "nested").mkdir(parents=True)
    draw((220, 30, 30), "circle").save(images / "a_red.png")
    draw((30, 30, 220), "square").save(images / "b_blue.jpg")
    draw((240, 220, 20), "circle", (50, 30)).save(images / "nested" / "c_yellow.png")
    (images / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def loaded(saved):
    return load_model(saved / "model", device="cpu", dtype="float32")


def reference_answer(model, processor, image, prompt):
    """One image, one prompt, plain `generate` (greedy): the independent reference."""
    inputs = processor(images=[image], text=[f"<image>\n{prompt}"])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0]


def test_batched_answers_equal_one_by_one(loaded):
    model, processor = loaded
    images = [draw((220, 30, 30), "circle"), draw((30, 30, 220), "square"), draw((20, 200, 20), "circle", (30, 50))]
    # prompts of different lengths, so the batch is left-padded
    prompts = ["Describe the image.", "What colour is the shape? Answer in one word please.", "How many circles?"]
    requests = [Request({"id": i}, prompt, [image]) for i, (image, prompt) in enumerate(zip(images, prompts))]
    kwargs = {"max_new_tokens": MAX_NEW, "do_sample": False}
    batched = [r for batch in generate_answers(model, processor, requests, kwargs, batch_size=3) for r in batch]
    single = [r for batch in generate_answers(model, processor, requests, kwargs, batch_size=1) for r in batch]
    expected = [reference_answer(model, processor, image, prompt) for image, prompt in zip(images, prompts)]
    assert [r["answer"] for r in batched] == [r["answer"] for r in single] == expected
    assert [r["id"] for r in batched] == [0, 1, 2]
    assert len(set(expected)) > 1  # the answers depend on the input, so a mix-up would show


def test_collect_image_paths_recurses_and_filters(saved):
    found = collect_image_paths([saved / "images", saved / "missing.png"])
    assert [p.name for p in found] == ["a_red.png", "b_blue.jpg", "c_yellow.png", "missing.png"]


def test_caption_json_reports_bad_inputs_and_completes_the_rest(saved, loaded, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((saved / "images" / "b_blue.jpg").read_bytes()[:60])  # truncated JPEG
    code = main(["caption", "--model", str(saved / "model"), str(saved / "images"), str(corrupt),
                 str(tmp_path / "absent.png"), "--json", "--batch-size", "2", "--max-new-tokens", str(MAX_NEW),
                 "--device", "cpu", "--prompt", "Describe the image."])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert [r["file"].rsplit("/", 1)[-1] for r in records] == \
        ["a_red.png", "b_blue.jpg", "c_yellow.png", "corrupt.jpg", "absent.png"]
    assert "cannot read image" in records[3]["error"] and str(corrupt) in records[3]["error"]
    assert "not found" in records[4]["error"]
    model, processor = loaded
    for record in records[:3]:
        assert "error" not in record
        assert record["answer"] == reference_answer(model, processor, load_image(record["file"]), "Describe the image.")


def test_caption_without_failures_exits_zero_with_plain_output(saved, loaded, capsys):
    path = saved / "images" / "a_red.png"
    code = main(["caption", "--model", str(saved / "model"), str(path), "--max-new-tokens", str(MAX_NEW)])
    out = capsys.readouterr().out
    model, processor = loaded
    assert code == 0
    assert out == f"{path}\t{reference_answer(model, processor, load_image(path), 'Describe the image.')}\n"


def test_decompression_bomb_and_long_prompt_fail_alone(saved, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 300)).save(big)
    small = saved / "images" / "a_red.png"
    code = main(["caption", "--model", str(saved / "model"), str(big), str(small), "--json", "--max-pixels", "5000",
                 "--max-new-tokens", "2"])
    first, second = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and "decompression bomb" in first["error"] and "answer" in second

    code = main(["caption", "--model", str(saved / "model"), str(small), "--json", "--prompt", "circle " * 600,
                 "--max-new-tokens", "2"])
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and "PromptTooLongError" in record["error"] and "context of 512" in record["error"]


def test_ask_streams_the_same_answer(saved, loaded, capsys):
    path = saved / "images" / "nested" / "c_yellow.png"
    question = "How many circles are there?"
    args = ["ask", "--model", str(saved / "model"), str(path), question, "--max-new-tokens", str(MAX_NEW)]
    assert main(args + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    model, processor = loaded
    assert record["answer"] == reference_answer(model, processor, load_image(path), question)
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out.strip() == record["answer"]


def test_sampling_is_seeded_and_beam_search_runs(saved, capsys):
    path = str(saved / "images" / "a_red.png")
    base = ["caption", "--model", str(saved / "model"), path, "--json", "--max-new-tokens", "8"]
    outputs = []
    for _ in range(2):
        assert main(base + ["--temperature", "1.5", "--top-p", "0.95", "--seed", "1"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["answer"])
    assert outputs[0] == outputs[1]
    assert main(base + ["--num-beams", "3"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["answer"], str)


def test_fatal_errors_exit_two(saved, tmp_path, capsys):
    assert main(["caption", "--model", str(tmp_path), str(saved / "images")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["ask", "--model", str(saved / "model"), "x.png", "hi", "--stream", "--json"]) == 2
    assert "--stream" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["icd", "lqcd"])
def test_prompt_rewriting_mitigation_from_the_command_line(saved, loaded, capsys, method):
    # a command line cannot pass a processor: the runner hands it to the methods that rewrite prompts
    path = saved / "images" / "nested" / "c_yellow.png"
    args = ["ask", "--model", str(saved / "model"), str(path), "Is there a circle?", "--max-new-tokens", str(MAX_NEW),
            "--json", "--mitigation", method]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out)
    model, processor = loaded
    inputs = processor(images=[load_image(path)], text=["<image>\nIs there a circle?"])
    expected = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, mitigation=method,
                              processor=processor)
    assert record["answer"] == processor.batch_decode(expected[:, inputs["input_ids"].shape[1]:])[0]

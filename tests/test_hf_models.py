"""Hugging Face image-text-to-text models through the suite: tiny random Llava, Qwen2-VL, Idefics3 and Gemma 3
folders (built offline with each family's own classes) answer through our runner exactly as the family's own
`generate` does on the family's own prompt format, batched as one at a time, through `vlm caption/ask/eval`."""

import json

import pytest
import torch
from PIL import Image, ImageDraw

from data.scenes import SceneConfig, generate_scenes
from eval.inference import Request, generate_answers, load_model
from eval.sources import scenes_pope
from eval.tasks import run_pope
from vlm.cli import main
from vlm.testing import TINY_HF_FAMILIES, save_tiny_hf_vlm

MAX_NEW = 5
GREEDY = {"max_new_tokens": MAX_NEW, "do_sample": False}
# The prompt each family's released chat template writes for one image and a question (written by hand).
FAMILY_PROMPTS = {
    "llava": "USER: <image>\n{q} ASSISTANT:",
    "qwen2_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
    "idefics3": "<|im_start|>User:<image>{q}<end_of_utterance>\nAssistant:",
    "gemma3": "<bos><start_of_turn>user\n<start_of_image>{q}<end_of_turn>\n<start_of_turn>model\n",
}
pytestmark = pytest.mark.filterwarnings("ignore:Glyph .* missing from font")


def draw(colour, size) -> Image.Image:
    image = Image.new("RGB", size, (120, 130, 140))
    ImageDraw.Draw(image).ellipse((4, 4, size[0] - 4, size[1] - 4), fill=colour)
    return image


IMAGES = [draw((220, 30, 30), (40, 30)), draw((30, 30, 220), (32, 48)), draw((20, 200, 20), (64, 64))]
QUESTIONS = ["is there a star?", "Describe the image in detail please.", "what colour is the circle?"]


@pytest.fixture(scope="module", params=sorted(TINY_HF_FAMILIES))
def family(request, tmp_path_factory):
    folder = save_tiny_hf_vlm(request.param, tmp_path_factory.mktemp(request.param) / "model", seed=5)
    return request.param, folder, load_model(folder, device="cpu", dtype="float32")


def family_generate(model, processor, text: str, images: list) -> list[int]:
    """The family's own processor and `generate` on one prompt: the independent reference."""
    inputs = processor(text=[text], images=[images], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, **GREEDY)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def runner_answers(model, processor, requests, batch_size):
    return [record for batch in generate_answers(model, processor, requests, GREEDY, batch_size) for record in batch]


def test_prompts_are_the_family_format(family):
    name, _, (_, processor) = family
    rendered = processor.render([{"role": "user", "content": "<image>\nis there a star?"}])
    assert rendered == FAMILY_PROMPTS[name].format(q="is there a star?")


def test_runner_equals_family_generate_batched_or_not(family):
    name, _, (model, processor) = family
    hf_processor = processor.processor
    references = [hf_processor.decode(family_generate(model, hf_processor, FAMILY_PROMPTS[name].format(q=q), [image]),
                                      skip_special_tokens=True) for image, q in zip(IMAGES, QUESTIONS)]
    requests = [Request({"id": i}, q, [image]) for i, (image, q) in enumerate(zip(IMAGES, QUESTIONS))]
    one_by_one = runner_answers(model, processor, requests, batch_size=1)
    assert [r["answer"] for r in one_by_one] == references
    assert runner_answers(model, processor, requests, batch_size=3) == one_by_one  # left-padded batch
    assert len(set(references)) > 1  # the answers differ, so a mix-up between rows would show


def test_two_images_in_one_prompt(family):
    name, _, (model, processor) = family
    rendered = processor.render([{"role": "user", "content": "<image><image>Which is red?"}])
    marker = {"llava": "<image>", "qwen2_vl": "<|image_pad|>", "idefics3": "<image>", "gemma3": "<start_of_image>"}[name]
    assert rendered.count(marker) == 2 and "Which is red?" in rendered
    reference = family_generate(model, processor.processor, rendered, IMAGES[:2])
    [record] = runner_answers(model, processor, [Request({"id": 0}, "<image><image>Which is red?", IMAGES[:2])], 1)
    assert record["answer"] == processor.processor.decode(reference, skip_special_tokens=True)


def test_bad_requests_fail_alone(family, tmp_path):
    _, _, (model, processor) = family
    (tmp_path / "broken.png").write_bytes(b"not a png")
    requests = [Request({"id": 0}, "What is it?", [tmp_path / "broken.png"]),
                Request({"id": 1}, "<image><image>two markers", [IMAGES[0]]),
                Request({"id": 2}, "what colour? " * 400, [IMAGES[0]]),
                Request({"id": 3}, QUESTIONS[0], [IMAGES[0]])]
    records = runner_answers(model, processor, requests, batch_size=4)
    assert [("error" in r) for r in records] == [True, True, True, False]
    assert "markers" in records[1]["error"] and "context" in records[2]["error"]


def test_cli_caption_ask_and_resumable_pope(family, tmp_path, capsys):
    name, folder, (model, processor) = family
    IMAGES[0].save(tmp_path / "red.png")
    assert main(["caption", "--model", str(folder), str(tmp_path / "red.png"), "--max-new-tokens", str(MAX_NEW),
                 "--device", "cpu", "--json"]) == 0
    [caption] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [reference] = runner_answers(model, processor, [Request({}, "Describe the image.", [IMAGES[0]])], 1)
    assert caption["answer"] == reference["answer"]
    assert main(["ask", "--model", str(folder), str(tmp_path / "red.png"), QUESTIONS[0], "--max-new-tokens",
                 str(MAX_NEW), "--device", "cpu"]) == 0
    [reference] = runner_answers(model, processor, [Request({}, QUESTIONS[0], [IMAGES[0]])], 1)
    assert capsys.readouterr().out.strip() == reference["answer"].strip()

    scenes = tmp_path / "scenes"
    generate_scenes(scenes, num_images=4, seed=3, config=SceneConfig(image_size=32, splits={"test": 1.0},
                                                                     pope_per_image=1, captions_per_image=1))
    questions, image_root = scenes_pope(scenes, "test")
    questions = questions["random"]
    answers = tmp_path / "pope_random.answers.jsonl"
    full = run_pope(model, processor, questions, image_root, answers, batch_size=3, generation_kwargs=GREEDY)
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[:2]) + "\n")  # as if the run had been killed after two answers
    calls = []
    original = model.generate
    model.generate = lambda **kwargs: calls.append(kwargs["input_ids"].shape[0]) or original(**kwargs)
    try:
        resumed = run_pope(model, processor, questions, image_root, answers, batch_size=3, generation_kwargs=GREEDY)
    finally:
        model.generate = original
    assert sum(calls) == len(questions) - 2  # only the missing questions are asked again
    assert {k: v for k, v in resumed.items() if k != "answers_file"} == {k: v for k, v in full.items()
                                                                        if k != "answers_file"}


def test_cli_mitigation_runs_or_is_refused_by_name(family, tmp_path, capsys):
    name, folder, (model, processor) = family
    IMAGES[0].save(tmp_path / "red.png")
    assert main(["ask", "--model", str(folder), str(tmp_path / "red.png"), QUESTIONS[0], "--mitigation",
                 "pai:alpha=2.0", "--max-new-tokens", str(MAX_NEW), "--device", "cpu"]) == 0
    from vlm.mitigation import generate_with_mitigation

    inputs = processor.collate([processor.encode_prompt([{"role": "user", "content": "<image>\n" + QUESTIONS[0]}],
                                                        [IMAGES[0]])], [IMAGES[0]])
    output = generate_with_mitigation(model, {"pai": {"alpha": 2.0}}, **inputs, **GREEDY)
    expected = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:])[0]
    assert capsys.readouterr().out.strip() == expected.strip()

    code = main(["ask", "--model", str(folder), str(tmp_path / "red.png"), "Is it red?", "--mitigation", "paint",
                 "--max-new-tokens", str(MAX_NEW), "--device", "cpu"])
    error = capsys.readouterr().err
    if name == "llava":  # PAINT reads CLIP's class-token attention; the other towers have no class token
        assert code == 0
    else:
        assert code == 2 and f"PAINT ranks patches by class-token attention; the {name} tower" in error
        assert len(error.strip().splitlines()) == 1


def test_folders_that_are_no_vlm_are_refused(tmp_path, capsys):
    image = tmp_path / "red.png"
    IMAGES[0].save(image)
    cases = {
        "bert": ({"model_type": "bert"}, "AutoModelForImageTextToText"),
        "remote": ({"model_type": "llava", "auto_map": {"AutoModel": "modeling.MyModel"}}, "trust_remote_code"),
        "broken": (None, "not valid JSON"),
    }
    for name, (config, expected) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{" if config is None else json.dumps(config))
        assert main(["ask", "--model", str(folder), str(image), "What?", "--device", "cpu"]) == 2
        error = capsys.readouterr().err
        assert expected in error and str(folder) in error and len(error.strip().splitlines()) == 1


def test_model_without_its_processor_is_refused(tmp_path, capsys):
    from vlm.testing import tiny_hf_vlm

    model, _ = tiny_hf_vlm("llava")
    model.save_pretrained(tmp_path / "model")
    IMAGES[0].save(tmp_path / "red.png")
    assert main(["ask", "--model", str(tmp_path / "model"), str(tmp_path / "red.png"), "What?", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "processor" in error and len(error.strip().splitlines()) == 1

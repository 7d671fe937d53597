"""LLaVA-1.5 into `VisionLanguageModel` and back: logits equal `LlavaForConditionalGeneration`'s on tiny random
configs, from the llava-hf layout, from the original repository's, and through `vlm convert` folders."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

from vlm import VisionLanguageModel, VLMProcessor
from vlm.cli import main
from vlm.llava_convert import CLIP_TOWER, from_llava, to_llava
from vlm.testing import save_tiny_hf_vlm, tiny_hf_vlm, tiny_vlm

TOLERANCE = 1e-4  # max abs logit difference, float32


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    model, processor = tiny_hf_vlm("llava", seed=0)
    return model.eval(), processor


def inputs_for(config, batch: int = 2, seed: int = 0):
    """Two left-padded prompts, each with one image's placeholders, and random pixels."""
    generator = torch.Generator().manual_seed(seed)
    image = [config.image_token_id] * config.image_seq_length
    rows = [[5, 6] + image + [7, 8, 9], [5] + image + [9]]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])[:batch]
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])[:batch]
    size = config.vision_config.image_size
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.randn(batch, 3, size, size, generator=generator)}


def max_logit_difference(a, b, inputs) -> float:
    with torch.no_grad():
        left, right = a(**inputs).logits, b(**inputs).logits
    real = inputs["attention_mask"].bool()
    return (left - right)[real].abs().max().item()


def test_import_equals_llava(llava):
    model, _ = llava
    ours = from_llava(model)
    inputs = inputs_for(model.config)
    assert max_logit_difference(model, ours, inputs) <= TOLERANCE
    ours.vision_tower.feature_layer = -1  # the tower's last, normed output: what LLaVA does not read
    assert max_logit_difference(model, ours, inputs) > 1e-2


def test_export_equals_ours():
    torch.manual_seed(1)
    tower = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3, "mlp_ratio": 2.0,
             "act_layer": "quick_gelu"}
    ours, _ = tiny_vlm(vision=CLIP_TOWER, vision_kwargs=tower, vision_feature_layer=-2)
    llava = to_llava(ours)
    inputs = inputs_for(llava.config)
    assert max_logit_difference(ours.eval(), llava, inputs) <= TOLERANCE
    again = from_llava(llava)
    assert max_logit_difference(ours, again, inputs) <= TOLERANCE


def test_models_that_do_not_fit_llava_are_refused():
    ours, _ = tiny_vlm()  # timm's plain ViT: a patch bias, no pre-norm, its final normed features
    with pytest.raises(ValueError, match="does not fit LLaVA") as error:
        to_llava(ours)
    assert "vision_feature_layer=-1" in str(error.value) and "pre-norm" in str(error.value)


def test_convert_folders_both_ways_and_answer(llava, tmp_path, capsys):
    model, _ = llava
    source = save_tiny_hf_vlm("llava", tmp_path / "llava-hf", seed=0)
    assert main(["convert", "--to", "vlm", str(source), str(tmp_path / "ours")]) == 0
    ours = VisionLanguageModel.from_pretrained(tmp_path / "ours")
    processor = VLMProcessor.from_pretrained(tmp_path / "ours")
    reference = LlavaForConditionalGeneration.from_pretrained(source).eval()
    assert max_logit_difference(reference, ours.eval(), inputs_for(reference.config)) <= TOLERANCE

    # the same greedy answer from our processor's inputs, with the KV cache, as LLaVA's own generate
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    encoded = processor(images=[image], text=["<image>\nWhat colour is it?"])
    assert "USER: " in processor.tokenizer.decode(encoded["input_ids"][0])
    hf_inputs = {key: encoded[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    expected = reference.generate(**hf_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(**encoded, max_new_tokens=6, do_sample=False), expected)
    image.save(tmp_path / "red.png")
    assert main(["ask", "--model", str(tmp_path / "ours"), str(tmp_path / "red.png"), "What colour?", "--json"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # and back out: a llava-hf folder that transformers' own classes load
    assert main(["convert", "--to", "llava", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    assert max_logit_difference(reference, back, inputs_for(reference.config)) <= TOLERANCE
    assert AutoProcessor.from_pretrained(tmp_path / "back").tokenizer.chat_template
    assert main(["ask", "--model", str(tmp_path / "back"), str(tmp_path / "red.png"), "What colour?", "--json"]) == 0
    assert "answer" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_import_with_a_mask_mode_fine_tunes_from_llava(llava, tmp_path):
    source = save_tiny_hf_vlm("llava", tmp_path / "llava-hf", seed=0)
    assert main(["convert", "--to", "vlm", str(source), str(tmp_path / "aki"), "--attention-mode", "modality_mutual"]) == 0
    model = VisionLanguageModel.from_pretrained(tmp_path / "aki")
    processor = VLMProcessor.from_pretrained(tmp_path / "aki")
    assert model.config.attention_mode == "modality_mutual"
    conversation = [{"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "Red."}]
    batch = processor.apply_conversations([conversation], [[Image.new("RGB", (32, 32), (200, 40, 40))]])
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.connector.fc1.weight.grad.abs().sum() > 0


def write_original_layout(model, processor, folder):
    """A tiny LLaVA in the original repository's layout: Llama keys at the top, the projector as
    `model.mm_projector.{0,2}`, no tower weights; and the CLIP folder that `mm_vision_tower` would name."""
    config = model.config
    state = model.state_dict()
    weights = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            weights["model." + key.removeprefix("model.language_model.")] = value
        elif key.startswith("model.multi_modal_projector.linear_"):
            index = {"1": 0, "2": 2}[key[len("model.multi_modal_projector.linear_")]]
            weights[f"model.mm_projector.{index}." + key.rsplit(".", 1)[1]] = value
        elif key == "lm_head.weight":
            weights[key] = value
    folder.mkdir()
    save_file({key: value.contiguous() for key, value in weights.items()}, str(folder / "model.safetensors"))
    settings = {**config.text_config.to_dict(), "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
                "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": config.vision_config.hidden_size,
                "mm_vision_select_layer": config.vision_feature_layer, "mm_vision_select_feature": "patch",
                "mm_projector_type": "mlp2x_gelu"}
    (folder / "config.json").write_text(json.dumps(settings))
    processor.tokenizer.save_pretrained(folder)
    clip = CLIPVisionModel(config.vision_config)
    clip.load_state_dict({key.removeprefix("model.vision_tower."): value for key, value in state.items()
                          if key.startswith("model.vision_tower.")})
    clip.save_pretrained(folder.parent / "clip")
    processor.image_processor.save_pretrained(folder.parent / "clip")
    return folder, folder.parent / "clip"


def test_original_repository_layout(llava, tmp_path, capsys):
    model, processor = llava
    folder, clip = write_original_layout(model, processor, tmp_path / "llava-v1.5")
    assert main(["convert", "--to", "vlm", str(folder), str(tmp_path / "ours")]) == 2
    assert "--vision-tower" in capsys.readouterr().err
    assert main(["convert", "--to", "vlm", str(folder), str(tmp_path / "ours"), "--vision-tower", str(clip)]) == 0
    ours = VisionLanguageModel.from_pretrained(tmp_path / "ours").eval()
    assert max_logit_difference(model, ours, inputs_for(model.config)) <= TOLERANCE


def test_other_folders_are_refused_in_one_line(tmp_path, capsys):
    folder = tmp_path / "qwen"
    save_tiny_hf_vlm("qwen2_vl", folder)
    assert main(["convert", "--to", "vlm", str(folder), str(tmp_path / "out")]) == 2
    assert "is not LLaVA" in capsys.readouterr().err

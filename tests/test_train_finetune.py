"""The training loop on tiny models: learning, stages, gradient accumulation, LoRA merge, NaN guard."""

import json

import pytest
import torch

from train.config import ConfigError
from train.finetune import NonFiniteLossError, train
from train.lora import load_adapter, merge_adapter
from train.metrics import read_metrics
from test_train_helpers import final_weights, make_scenes, save_tiny_model, tiny_config
from vlm import VisionLanguageModel, VLMProcessor




@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base") / "model")


def init_from(base_dir):
    return {"model.init_from": str(base_dir), "model.vlm.text_config": "null"}


def test_loss_goes_down_and_outputs_are_complete(tmp_path, scenes):
    config = tiny_config(tmp_path / "run", scenes, max_steps=30, **{"optim.lr": 3e-3, "logging.plot": "true"})
    final = train(config)
    losses = [row["loss"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    # the final folder loads as is and answers
    model = VisionLanguageModel.from_pretrained(final)
    processor = VLMProcessor.from_pretrained(final)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (final / "train_config.yaml").is_file()
    from data.llava import LlavaConversationDataset

    sample = LlavaConversationDataset(scenes / "conversations_train.json", scenes / "images" / "train")[0]
    batch = processor(images=sample["images"], text=[sample["messages"][0]["content"]])
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]


@pytest.mark.parametrize("stage, lora, trained", [
    ("align", "true", {"connector"}),
    ("finetune", "false", {"connector", "language_model"}),
    ("full", "true", {"connector", "vision_tower", "language_model"}),
])
def test_stage_changes_only_its_parameters(tmp_path, scenes, base_dir, stage, lora, trained):
    config = tiny_config(tmp_path / "run", scenes, max_steps=2, **init_from(base_dir),
                         **{"stage.name": stage, "stage.lora": lora})
    before, after = final_weights(base_dir), final_weights(train(config))
    assert before.keys() == after.keys()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if name.split(".")[0] in trained and before[name].dtype.is_floating_point and "norm" not in name:
            assert changed or before[name].numel() == 0, f"{stage}: {name} did not change"
        elif name.split(".")[0] not in trained:
            assert not changed, f"{stage}: frozen {name} changed"


def test_lora_adapter_merge_equals_unmerged(tmp_path, scenes, base_dir):
    config = tiny_config(tmp_path / "run", scenes, max_steps=3, **init_from(base_dir),
                         **{"stage.name": "finetune", "stage.lora": "true", "optim.lr": 1e-2, "lora.dropout": 0.0,
                            "lora.r": 4})
    final = train(config)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "base_model.json").read_text())["base_model_dir"] == str(base_dir)
    before, after = final_weights(base_dir), final_weights(final)
    # LoRA changed the LLM's linear layers and the connector, nothing else
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(".self_attn.q_proj." in name for name in changed)
    assert any(name.startswith("connector.") for name in changed)
    assert not any(name.startswith("vision_tower.") or "embed_tokens" in name or "norm" in name for name in changed)

    processor = VLMProcessor.from_pretrained(final)
    from PIL import Image

    inputs = processor(images=[Image.new("RGB", (32, 32), (250, 10, 10))], text=["<image>\nWhat is it?"])
    unmerged = load_adapter(VisionLanguageModel.from_pretrained(base_dir), adapter).eval()
    merged_here = VisionLanguageModel.from_pretrained(merge_adapter(base_dir, adapter, tmp_path / "merged")).eval()
    trained_final = VisionLanguageModel.from_pretrained(final).eval()
    base = VisionLanguageModel.from_pretrained(base_dir).eval()
    with torch.no_grad():
        logits = {name: model(**inputs).logits for name, model in
                  [("unmerged", unmerged), ("merged", merged_here), ("final", trained_final), ("base", base)]}
    torch.testing.assert_close(logits["merged"], logits["unmerged"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["final"], logits["unmerged"], atol=1e-5, rtol=1e-5)
    assert (logits["base"] - logits["unmerged"]).abs().max() > 1e-3  # the adapter matters


def test_gradient_accumulation_matches_one_big_batch(tmp_path, scenes, base_dir):
    one = train(tiny_config(tmp_path / "one", scenes, max_steps=3, batch_size=8, **init_from(base_dir),
                            **{"stage.name": "full"}))
    accumulated = train(tiny_config(tmp_path / "acc", scenes, max_steps=3, batch_size=4, grad_accum=2,
                                    **init_from(base_dir), **{"stage.name": "full"}))
    a, b = final_weights(one), final_weights(accumulated)
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-5
    base = final_weights(base_dir)
    assert any(not torch.equal(a[name], base[name]) for name in a)  # the runs did train


def test_length_split_batches_match_one_batch(tmp_path, scenes, base_dir):
    """Cutting each batch into length-sorted micro-batches (with accumulation on top) changes padding only."""
    one = train(tiny_config(tmp_path / "one", scenes, max_steps=3, batch_size=8, **init_from(base_dir),
                            **{"stage.name": "full"}))
    split = train(tiny_config(tmp_path / "split", scenes, max_steps=3, batch_size=4, grad_accum=2,
                              **init_from(base_dir), **{"stage.name": "full", "data.split_by_length": 3}))
    a, b = final_weights(one), final_weights(split)
    assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-5
    with pytest.raises(ConfigError, match="split_by_length"):
        tiny_config(tmp_path / "bad", scenes, batch_size=4, **{"data.split_by_length": 5}).validate()


def test_nan_loss_stops_with_the_step(tmp_path, scenes, base_dir):
    broken = tmp_path / "broken"
    model = VisionLanguageModel.from_pretrained(base_dir)
    with torch.no_grad():
        next(model.connector.parameters()).fill_(float("nan"))
    model.save_pretrained(broken)
    VLMProcessor.from_pretrained(base_dir).save_pretrained(broken)
    config = tiny_config(tmp_path / "run", scenes, max_steps=3, **init_from(broken))
    with pytest.raises(NonFiniteLossError, match="step 1"):
        train(config)
    assert not (tmp_path / "run" / "final").exists()


def test_refuses_to_overwrite_checkpoints_without_resume(tmp_path, scenes, base_dir):
    settings = dict(max_steps=2, **init_from(base_dir), **{"checkpoint.save_every": 1})
    train(tiny_config(tmp_path / "run", scenes, **settings))
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_config(tmp_path / "run", scenes, **settings))


def test_library_progress_bars_are_off_while_training_and_restored_after(tmp_path, monkeypatch):
    from transformers.utils import logging as transformers_logging

    seen = []
    save = VisionLanguageModel.save_pretrained

    def spy(self, *args, **kwargs):
        seen.append(transformers_logging.is_progress_bar_enabled())
        return save(self, *args, **kwargs)

    monkeypatch.setattr(VisionLanguageModel, "save_pretrained", spy)
    transformers_logging.enable_progress_bar()
    train(tiny_config(tmp_path / "run", make_scenes(tmp_path / "scenes", 10), max_steps=1))
    assert seen and not any(seen)  # transformers' weight-saving bars were off
    assert transformers_logging.is_progress_bar_enabled()  # and are the caller's again

"""The `mitigation=` switch: off means plain generate, on leaves nothing behind; specs, combinations, statistics."""

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor

from vlm import VisionLanguageModel
from vlm.mitigation import (STATS_FILE, calibrate_mitigation_stats, default_layers, parse_mitigation_arg,
                            resolve_mitigation, save_mitigation_stats)
from vlm.mitigation.attention import EDITS_ATTRIBUTE
from vlm.testing import tiny_vlm

IMAGES = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.linear_gradient("L").convert("RGB")]
PROMPTS = ["<image>\nWhat is in the picture?", "Describe <image> in detail please."]


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_vlm(attention_mode="modality_mutual", seed=11)
    return model, processor, processor(images=IMAGES, text=PROMPTS)


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def leftovers(model):
    return [name for name, m in model.named_modules() if hasattr(m, EDITS_ATTRIBUTE)]


@pytest.mark.parametrize("off", [None, [], {}, ""])
def test_off_is_plain_generate(tiny, off):
    model, _, inputs = tiny
    plain = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False, mitigation=off), plain)


class Boom(LogitsProcessor):
    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.start:
            raise RuntimeError("boom")
        return scores

    def __init__(self, start):
        self.start = start


def test_nothing_remains_after_a_call_or_an_exception(tiny):
    model, processor, inputs = tiny
    hooks, backend = hook_count(model), model.language_model.config._attn_implementation
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    spec = {"vhr": {}, "pai": {"layers": [1]}, "var": {"sink_dims": [0, 1], "tau": 1.0, "layers": [0]}, "vcd": {}}
    model.generate(**inputs, max_new_tokens=4, do_sample=False, mitigation=spec)
    assert hook_count(model) == hooks and not leftovers(model)
    assert model.language_model.config._attn_implementation == backend
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(**inputs, max_new_tokens=4, do_sample=False, mitigation=spec,
                       logits_processor=[Boom(inputs["input_ids"].shape[1])])
    assert hook_count(model) == hooks and not leftovers(model)
    assert model.language_model.config._attn_implementation == backend
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), plain)


def test_batched_mitigated_generation_equals_per_sample(tiny):
    model, processor, inputs = tiny
    spec = {"vhr": {}, "pai": {"alpha": 0.5}, "icd": {}}
    batched = model.generate(**inputs, max_new_tokens=4, do_sample=False, mitigation=spec, processor=processor)
    for index in range(2):
        single_inputs = processor(images=[IMAGES[index]], text=[PROMPTS[index]])
        single = model.generate(**single_inputs, max_new_tokens=4, do_sample=False, mitigation=spec,
                                processor=processor)
        assert torch.equal(batched[index, -4:], single[0, -4:])


def test_parse_mitigation_arg():
    assert parse_mitigation_arg("vhr,pai:alpha=0.2") == {"vhr": {}, "pai": {"alpha": 0.2}}
    assert parse_mitigation_arg("paint:alpha=0.7:beta=0.4:head_specific=true, var:layers=1+2:sink_dims=none") == {
        "paint": {"alpha": 0.7, "beta": 0.4, "head_specific": True}, "var": {"layers": [1, 2], "sink_dims": None}}
    with pytest.raises(ValueError, match="unknown method 'opera'"):
        parse_mitigation_arg("vhr,opera")
    with pytest.raises(ValueError, match="must be key=value"):
        parse_mitigation_arg("pai:alpha")


def test_default_layers_scale_with_depth():
    assert default_layers("vhr", 32) == [1, *range(18, 32)]
    assert default_layers("pai", 32) == list(range(2, 32))
    assert default_layers("var", 32) == list(range(2, 31))
    assert default_layers("vhr", 2) == [1] and default_layers("pai", 2) == [0, 1] and default_layers("var", 2) == [0]


@pytest.mark.parametrize("spec, message", [
    (["vcd", "icd"], "vcd and icd each need the contrast branch"),
    ({"pai": {"cfg": 1.1}, "lqcd": {}}, "pai and lqcd each need the contrast branch"),
    (["pai", "paint"], "use one of them"),
    ({"var": {"layers": [2, 3]}, "pai": {"layers": [3]}}, r"var and pai both edit the attention of layers \[3\]"),
    ({"vhr": {"layers": [9]}}, r"layers \[9\] out of range for a 4-layer LLM"),
    ({"pai": {"gamma": 2}}, r"unknown option\(s\) \['gamma'\]"),
])
def test_refused_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_mitigation(spec, num_layers=4)


def test_compatible_combination_resolves():
    resolved = resolve_mitigation({"vhr": {}, "var": {"layers": [1]}, "pai": {"layers": [2, 3]}, "vcd": {}}, 4)
    assert resolved["pai"]["alpha"] == 0.2 and resolved["vcd"]["beta"] == 0.1 and resolved["vhr"]["layers"] == [1, 2, 3]


def test_var_without_sink_dims_says_how_to_get_them(tiny):
    model, _, inputs = tiny
    with pytest.raises(ValueError, match="massive-activation dims"):
        model.generate(**inputs, max_new_tokens=1, mitigation=["var"])


def test_statistics_are_saved_with_the_model_and_used(tmp_path, tiny):
    model, processor, inputs = tiny
    stats = calibrate_mitigation_stats(model, processor, IMAGES * 2, batch_size=3)
    assert stats["sink_dims"].shape == (2,)
    heads = model.config.text_config.num_attention_heads
    assert stats["visual_sensitivity"].shape == (2, heads) and (stats["visual_sensitivity"] > 0).all()
    # the divergence of layer 0 is the distance of its head outputs with and without the image
    captured = []
    hook = model.language_model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: captured.append(args[0][:, -1]))
    from vlm.mitigation.contrastive import without_image
    with torch.no_grad():
        single = processor(images=IMAGES, text=["<image>\nDescribe the image in detail."] * 2)
        model(**single)
        model(**without_image(single, processor.tokenizer.pad_token_id))
    hook.remove()
    divergence = (captured[0] - captured[1]).view(2, heads, -1).norm(dim=-1).mean(0)
    torch.testing.assert_close(stats["visual_sensitivity"][0], divergence, atol=1e-4, rtol=1e-4)

    model.save_pretrained(tmp_path)
    save_mitigation_stats(stats, tmp_path)
    assert (tmp_path / STATS_FILE).is_file()
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    out = loaded.generate(**inputs, max_new_tokens=2, do_sample=False,
                          mitigation={"var": {"tau": 1.0}, "paint": {"head_specific": True, "layers": [1]}})
    assert torch.equal(loaded.mitigation_stats["sink_dims"], stats["sink_dims"])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_paint_head_specific_needs_statistics():
    model, processor = tiny_vlm(seed=12)
    with pytest.raises(ValueError, match="visual_sensitivity statistics"):
        model.generate(**processor(images=IMAGES[:1], text=PROMPTS[:1]), max_new_tokens=1,
                       mitigation={"paint": {"head_specific": True}})


@pytest.mark.parametrize("spec", [{"pai": {"alpha": 0.8}}, {"paint": {"alpha": 0.8, "beta": 0.5}},
                                  {"var": {"sink_dims": [0, 1], "tau": 1.0}}, {"vhr": {}, "pai": {"alpha": 0.5}}])
def test_without_a_cache_equals_with_one(tiny, spec):
    """Re-running prompt and answer at every step (use_cache=False) edits the rows the cached steps edited."""
    model, _, inputs = tiny
    runs = [model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=use_cache, mitigation=spec,
                           output_logits=True, return_dict_in_generate=True) for use_cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert max((a - b).abs().max() for a, b in zip(runs[0].logits, plain.logits)) > 1e-4  # the edit does something

"""Visual-token exit: dropping the image tokens from layer k on computes exactly what the full model computes when,
from layer k on, no query may attend to an image key (checked against that masked model, with eager attention, on
our model and each Hugging Face family); the cache keeps no image entries above the exit; cached equals uncached;
exit after the last layer is plain generate; methods needing image attention above the exit are refused."""

import pytest
import torch
from PIL import Image

from vlm.mitigation import generate_with_mitigation, resolve_mitigation
from vlm.mitigation.model_parts import decoder_layers, image_positions, text_decoder
from vlm.mitigation.token_exit import pack_kept
from vlm.testing import TINY_HF_FAMILIES, tiny_hf_vlm, tiny_vlm

RED, GRADIENT = Image.new("RGB", (40, 30), (200, 30, 30)), Image.linear_gradient("L").convert("RGB").resize((36, 36))
GREEDY = {"max_new_tokens": 5, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}


def suite_batch(attention_mode="causal"):
    """Our model; a left-padded batch whose rows hold one and two images."""
    model, processor = tiny_vlm(attention_mode=attention_mode, seed=3)
    prompts = ["<image>\nWhat is in the picture?", "<image> and <image>: which one is red?"]
    return model, processor(images=[RED, RED, GRADIENT], text=prompts)


def hf_batch(family):
    from vlm.hf_models import ChatProcessor

    model, processor = tiny_hf_vlm(family, seed=2)
    chat = ChatProcessor(processor)
    prompts, images = ["<image>\nIs there a star?", "<image>\nDescribe the image in detail please."], [RED, GRADIENT]
    encoded = [chat.encode_prompt([{"role": "user", "content": p}], [image]) for p, image in zip(prompts, images)]
    return model, chat.collate(encoded, images)


class ImageKeysBlocked:
    """The reference: the full model, whose layers >= `layer` give every query an additive mask blocking the
    prefill's image keys. Needs eager attention (an explicit float mask at every step)."""

    def __init__(self, model, layer, image, rows=None):
        """`rows` (B,) bool: the rows whose image keys are blocked (default: all)."""
        self.model, self.layer, self.hooks = model, layer, []
        self.image = image if rows is None else image & rows[:, None]

    def hook(self, module, args, kwargs):
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dtype.is_floating_point
        keys = torch.nn.functional.pad(self.image, (0, mask.shape[-1] - self.image.shape[1]))
        kwargs["attention_mask"] = mask.masked_fill(keys[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    def __enter__(self):
        self.hooks = [layer.register_forward_pre_hook(self.hook, with_kwargs=True)
                      for layer in decoder_layers(self.model)[self.layer:]]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


def reference_generate(model, inputs, layer, rows=None, **kwargs):
    image = image_positions(model, inputs["input_ids"], None)  # the placeholders
    decoder = text_decoder(model)
    original = decoder.config._attn_implementation
    decoder.set_attn_implementation("eager")
    try:
        with ImageKeysBlocked(model, layer, image, rows):
            return model.generate(**inputs, **kwargs)
    finally:
        decoder.set_attn_implementation(original)


def assert_same_generation(ours, theirs, atol=1e-4):
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def test_pack_kept_packs_each_row_to_the_right():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = pack_kept(keep)
    assert index.tolist() == [[0, 2, 3], [0, 0, 1]] and valid.tolist() == [[True, True, True], [False, False, True]]


@pytest.mark.parametrize("attention_mode", ["causal", "modality_mutual", "bidirectional_visual"])
def test_exit_equals_blocking_image_keys_on_our_model(attention_mode, layer=1):
    model, inputs = suite_batch(attention_mode)
    theirs = reference_generate(model, inputs, layer, **GREEDY)
    for use_cache in (True, False):  # cached decode steps and forwards re-running prompt and answer
        ours = model.generate(**inputs, **GREEDY, use_cache=use_cache, mitigation={"exit": {"layer": layer}})
        assert_same_generation(ours, theirs)


def test_exit_without_padding_keeps_sdpa_unmasked_and_exact():
    """A batch of one: nothing to pack, so the layers above the exit run SDPA without a mask (its causal fast path)."""
    model, processor = tiny_vlm(seed=3)
    inputs = processor(images=[GRADIENT], text=["<image>\nWhat is in the picture?"])
    theirs = reference_generate(model, inputs, 1, **GREEDY)
    assert_same_generation(model.generate(**inputs, **GREEDY, mitigation="exit:layer=1"), theirs)


def test_exit_differs_from_plain_and_after_the_last_layer_is_plain():
    model, inputs = suite_batch()
    plain = model.generate(**inputs, **GREEDY)
    last = model.generate(**inputs, **GREEDY, mitigation="exit:layer=2")  # the tiny LLM has 2 layers
    assert_same_generation(last, plain, atol=0)
    early = model.generate(**inputs, **GREEDY, mitigation="exit:layer=1")
    assert not torch.allclose(early.logits[0], plain.logits[0], atol=1e-3)


def test_the_cache_holds_no_image_entries_above_the_exit():
    model, inputs = suite_batch()
    image = inputs["input_ids"] == model.config.image_token_id
    out = model.generate(**inputs, **GREEDY, mitigation="exit:layer=1")
    length = inputs["input_ids"].shape[1] + GREEDY["max_new_tokens"] - 1  # the last token is never fed back
    kept = int((~image).sum(1).max())  # rows packed to the longest: the one-image row
    assert out.past_key_values.layers[0].keys.shape[-2] == length
    assert out.past_key_values.layers[1].keys.shape[-2] == length - (inputs["input_ids"].shape[1] - kept)
    assert int(image.sum(1).min()) > 0 and image.sum(1).tolist()[0] != image.sum(1).tolist()[1]


def test_hooks_are_removed():
    model, inputs = suite_batch()
    count = sum(len(m._forward_pre_hooks) for m in model.modules())
    model.generate(**inputs, max_new_tokens=2, mitigation="exit:layer=1")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == count


def test_exit_with_a_contrast_branch_composes_and_the_branch_exits_too():
    """VCD's branch has its own cache, so it exits with its own kept tokens: compared with VCD on the masked model."""
    model, inputs = suite_batch()
    image = image_positions(model, inputs["input_ids"], None)
    decoder = text_decoder(model)
    decoder.set_attn_implementation("eager")
    try:
        with ImageKeysBlocked(model, 1, image):
            theirs = model.generate(**inputs, **GREEDY, mitigation="vcd")
    finally:
        decoder.set_attn_implementation("sdpa")
    ours = model.generate(**inputs, **GREEDY, mitigation="vcd,exit:layer=1")
    assert_same_generation(ours, theirs)


@pytest.mark.parametrize("spec, message", [
    ("pai:layers=1,exit:layer=1", "pai works on image attention in layers \\[1\\]"),
    ("vhr,exit:layer=1", "vhr works on image attention"),
    ("exit:layer=3", "layer=3 must be .auto. or an int in \\[1, 2\\]"),
    ("exit:layer=0", "layer=0 must be .auto. or an int in \\[1, 2\\]"),
])
def test_methods_on_image_attention_above_the_exit_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_mitigation(spec, num_layers=2)


def test_exit_composes_with_methods_below_it():
    resolved = resolve_mitigation("pai:layers=0,vcd,exit", num_layers=2)
    assert resolved["exit"]["layer"] == 1 and resolved["pai"]["layers"] == [0]


@pytest.mark.parametrize("family", sorted(TINY_HF_FAMILIES))
def test_exit_equals_blocking_image_keys_on_hf_families(family):
    model, inputs = hf_batch(family)
    theirs = reference_generate(model, inputs, 1, **GREEDY)
    for use_cache in (True, False):
        ours = generate_with_mitigation(model, "exit:layer=1", **inputs, **GREEDY, use_cache=use_cache)
        assert_same_generation(ours, theirs)
    kept = int((inputs["input_ids"] != model.config.image_token_id).sum(1).max())
    cached = generate_with_mitigation(model, "exit:layer=1", **inputs, **GREEDY).past_key_values
    assert cached.layers[1].keys.shape[-2] == kept + GREEDY["max_new_tokens"] - 1


def test_sliding_window_layers_refuse_sequences_beyond_the_window():
    model, inputs = hf_batch("gemma3")
    window = text_decoder(model).config.sliding_window
    with pytest.raises(ValueError, match=f"within the window of {window} tokens"):
        generate_with_mitigation(model, "exit:layer=1", **inputs, max_new_tokens=window, min_new_tokens=window)


def test_the_benchmark_measures_every_exit_layer(tmp_path, capsys):
    """benchmarks.visual_exit end to end on a saved tiny model: one row per exit layer, fewer FLOPs than plain."""
    from benchmarks.visual_exit import main
    from data.scenes import SceneConfig, generate_scenes

    model, processor = tiny_vlm(seed=3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    generate_scenes(tmp_path / "scenes", num_images=4, seed=3,
                    config=SceneConfig(image_size=32, splits={"test": 1.0}, pope_per_image=1))
    rows = main(["--model", str(tmp_path / "model"), "--scenes", str(tmp_path / "scenes"), "--batch-size", "2",
                 "--rounds", "1", "--threads", "1", "--pope", "4", "--chair", "2"])
    assert list(rows) == ["none", "exit:layer=1"]
    assert rows["none"]["pope_flops"] == 1.0 and rows["exit:layer=1"]["pope_flops"] < 1.0
    assert 0 <= rows["exit:layer=1"]["pope_acc"] <= 1 and "chair_i" in rows["exit:layer=1"]
    assert "| exit:layer=1 |" in capsys.readouterr().out


def routers_exiting_at(model, layer):
    """Routers that say "stay" below `layer` and "exit" from it on, whatever the input."""
    from vlm.mitigation.token_exit import ExitRouters

    config = model.config.get_text_config()
    routers = ExitRouters(config.hidden_size, config.num_hidden_layers, width=8)
    for index, router in enumerate(routers.routers):
        torch.nn.init.zeros_(router[2].weight)
        router[2].bias.data = torch.tensor([0.0, 1.0] if index >= layer else [1.0, 0.0])
    return routers


@pytest.mark.parametrize("layer", [1, 2])
def test_auto_exit_follows_its_routers(layer):
    """exit:layer=auto exits where the routers first say so: the same generation as the fixed exit there
    (layer 2 of 2: never, plain decoding)."""
    model, inputs = suite_batch()
    model.mitigation_stats = routers_exiting_at(model, layer).state()
    try:
        auto = model.generate(**inputs, **GREEDY, mitigation="exit:layer=auto")
        fixed = model.generate(**inputs, **GREEDY, mitigation={"exit": {"layer": layer}})
        assert_same_generation(auto, fixed, atol=0)
    finally:
        del model.mitigation_stats


def separating_routers(model, inputs, layer: int):
    """Routers whose layer-`layer` router exits the batch's first row only (it tells the two rows apart by the
    features entering that layer); every later layer's router exits whatever remains."""
    from vlm.mitigation.token_exit import ExitRouters

    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer]  # what enters the layer
    text = ~image_positions(model, inputs["input_ids"], None) & inputs["attention_mask"].bool()
    features = torch.nn.functional.gelu(ExitRouters.features(hidden, text))
    first, second = features
    size = features.shape[1]
    routers = ExitRouters(size // 2, len(decoder_layers(model)), width=size)
    with torch.no_grad():
        for index, router in enumerate(routers.routers):
            router[2].weight.zero_()
            router[2].bias.copy_(torch.tensor([1.0, 0.0] if index < layer else [0.0, 1.0]))
        router = routers.routers[layer]
        router[0].weight.copy_(torch.eye(size))
        router[0].bias.zero_()
        router[2].weight[1] = first - second  # logit 1 above 0 on the first row's side of the midpoint
        router[2].bias.copy_(torch.tensor([0.0, -float((first - second) @ (first + second)) / 2]))
    return routers


def test_auto_exit_decides_per_row_at_different_layers():
    """A 3-layer LLM whose first row exits at layer 1 and second at layer 2 (its kept tokens cut a second time):
    the full model with the first row's image keys blocked from layer 1 and the second's from layer 2."""
    model, processor = tiny_vlm(seed=3, text_overrides={"num_hidden_layers": 3})
    inputs = processor(images=[RED, RED, GRADIENT], text=["<image>\nWhat is in the picture?",
                                                          "<image> and <image>: which one is red?"])
    model.mitigation_stats = separating_routers(model, inputs, 1).state()
    try:
        ours = model.generate(**inputs, **GREEDY, mitigation="exit:layer=auto")
    finally:
        del model.mitigation_stats
    image = image_positions(model, inputs["input_ids"], None)
    decoder = text_decoder(model)
    decoder.set_attn_implementation("eager")
    try:
        with ImageKeysBlocked(model, 1, image, torch.tensor([True, False])), \
                ImageKeysBlocked(model, 2, image, torch.tensor([False, True])):
            theirs = model.generate(**inputs, **GREEDY)
    finally:
        decoder.set_attn_implementation("sdpa")
    assert_same_generation(ours, theirs)
    cache = ours.past_key_values
    assert [cache.layers[i].keys.shape[-2] for i in range(3)] == [
        inputs["input_ids"].shape[1] + 4,  # every token
        inputs["input_ids"].shape[1] + 4,  # the second row keeps its two images: nothing shorter to pack to
        int((~image).sum(1).max()) + 4]  # no image left


def test_auto_exit_decides_per_row():
    """Routers that tell the two rows apart at layer 1: the first row's image tokens leave there, the second's stay,
    as on the full model with only the first row's image keys blocked from layer 1."""
    model, inputs = suite_batch()
    model.mitigation_stats = separating_routers(model, inputs, 1).state()  # the 2-layer LLM has no layer 2
    try:
        ours = model.generate(**inputs, **GREEDY, mitigation="exit:layer=auto")
    finally:
        del model.mitigation_stats
    theirs = reference_generate(model, inputs, 1, rows=torch.tensor([True, False]), **GREEDY)
    assert_same_generation(ours, theirs)
    both = reference_generate(model, inputs, 1, **GREEDY)
    assert not torch.allclose(ours.logits[0][1], both.logits[0][1], atol=1e-3)  # the second row kept its image


def test_auto_exit_without_routers_says_how_to_train_them():
    model, inputs = suite_batch()
    model.mitigation_stats = {}
    with pytest.raises(ValueError, match="python -m vlm.mitigation"):
        model.generate(**inputs, max_new_tokens=2, mitigation="exit:layer=auto")


def test_exit_labels_follow_the_agreement_rule():
    """DyVTE's labels: every layer passes a rule that asks nothing and fails one that asks more than agreement."""
    from vlm.mitigation.token_exit import exit_labels

    model, inputs = suite_batch()
    answer = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    continuation = answer[:, inputs["input_ids"].shape[1]:]
    assert exit_labels(model, inputs, continuation, agreement=0.0, loss_ratio=float("inf"))[:, 1:].all()
    assert not exit_labels(model, inputs, continuation, agreement=1.01).any()
    strict = exit_labels(model, inputs, continuation)
    assert not strict[:, 0].any()  # layer 0 never exits


def test_calibration_trains_routers_that_reload_and_run(tmp_path):
    from vlm.mitigation import calibrate_mitigation_stats, load_mitigation_stats, save_mitigation_stats
    from vlm.mitigation.token_exit import ExitRouters

    model, processor = tiny_vlm(seed=3)
    stats = calibrate_mitigation_stats(model, processor, [RED, GRADIENT, RED], batch_size=2)
    assert any(key.startswith("exit_router.") for key in stats)
    save_mitigation_stats(stats, tmp_path)
    config = model.config.text_config
    routers = ExitRouters.from_stats(load_mitigation_stats(tmp_path), config.hidden_size, config.num_hidden_layers)
    features = torch.randn(3, 2 * config.hidden_size)
    torch.testing.assert_close(routers.logits(1, features),
                               ExitRouters.from_stats(stats, config.hidden_size, config.num_hidden_layers).logits(1, features))


def test_routers_of_the_calibration_command_reload_with_the_model(tmp_path):
    """As a user: `python -m vlm.mitigation` on a saved model, the model reloaded from its folder, then
    exit:layer=auto: a prompt of one row exits at one layer, so the answer is that of a fixed exit (or plain)."""
    from vlm import VisionLanguageModel
    from vlm.mitigation import STATS_FILE
    from vlm.mitigation.__main__ import main

    model, processor = tiny_vlm(seed=3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    for index, image in enumerate([RED, GRADIENT, RED.rotate(90)]):
        image.save(tmp_path / "images" / f"{index}.png")
    main(["--model", str(tmp_path / "model"), "--images", str(tmp_path / "images"), "--num", "3"])
    assert (tmp_path / "model" / STATS_FILE).is_file()
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "model").eval()
    inputs = processor(images=[GRADIENT], text=["<image>\nWhat is in the picture?"])
    auto = reloaded.generate(**inputs, **GREEDY, mitigation="exit:layer=auto")
    layers = reloaded.config.text_config.num_hidden_layers
    fixed = [reloaded.generate(**inputs, **GREEDY, mitigation={"exit": {"layer": layer}})
             for layer in range(1, layers + 1)]  # the last: no exit
    assert any(torch.equal(auto.sequences, other.sequences)
               and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(auto.logits, other.logits)) for other in fixed)


def test_exit_from_the_command_line_matches_the_api(tmp_path, capsys):
    """`vlm ask --mitigation exit:layer=1` answers as `generate(mitigation="exit:layer=1")` does."""
    import json

    from vlm.cli import main

    model, processor = tiny_vlm(seed=3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    RED.save(tmp_path / "red.png")
    args = ["ask", "--model", str(tmp_path / "model"), str(tmp_path / "red.png"), "What is it?", "--max-new-tokens",
            "6", "--json", "--mitigation", "exit:layer=1"]
    assert main(args) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    inputs = processor(images=[RED], text=["<image>\nWhat is it?"])
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False, mitigation="exit:layer=1")
    assert answer == processor.batch_decode(expected[:, inputs["input_ids"].shape[1]:])[0]
    assert answer != processor.batch_decode(model.generate(**inputs, max_new_tokens=6, do_sample=False)
                                            [:, inputs["input_ids"].shape[1]:])[0]


@pytest.mark.parametrize("family", sorted(TINY_HF_FAMILIES))
def test_auto_exit_on_hf_families(family):
    """On a Hugging Face VLM the routers decide as on ours, and they train on its batches (Qwen2-VL's own token
    types extended as text for the teacher-forced answer)."""
    from vlm.mitigation.token_exit import ExitRouters, train_exit_routers

    model, inputs = hf_batch(family)
    model.mitigation_stats = routers_exiting_at(model, 1).state()
    auto = generate_with_mitigation(model, "exit:layer=auto", **inputs, **GREEDY)
    assert_same_generation(auto, generate_with_mitigation(model, "exit:layer=1", **inputs, **GREEDY), atol=0)
    trained = train_exit_routers(model, [dict(inputs)], new_tokens=3, steps=3)
    assert isinstance(trained, ExitRouters) and any(key.startswith("exit_router.") for key in trained.state())

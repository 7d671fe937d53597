"""The mitigation heads on Hugging Face VLM families: the edited attention path reproduces each family's own
attention (its masks, sliding windows, M-RoPE), PAI adds exactly alpha |score| on the image keys of its layers,
VAR keeps every row's mass, VHR measures its heads against the prompt without its image, VCD and PAI's guidance
follow the contrastive formula, and methods without an adapter are refused by name."""

import pytest
import torch
from PIL import Image

import vlm.mitigation.attention as attention_edits
from vlm.mitigation import generate_with_mitigation
from vlm.testing import TINY_HF_FAMILIES, tiny_hf_vlm
from test_mitigation_contrastive import noised_alone
from test_mitigation_edits import capture_scores

PROMPTS = ["<image>\nIs there a star?", "<image>\nDescribe the image in detail please."]
IMAGES = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.linear_gradient("L").convert("RGB").resize((36, 36))]
GREEDY = {"max_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module", params=sorted(TINY_HF_FAMILIES))
def family(request):
    from vlm.hf_models import ChatProcessor

    model, processor = tiny_hf_vlm(request.param, seed=2)
    chat = ChatProcessor(processor)
    encoded = [chat.encode_prompt([{"role": "user", "content": p}], [image]) for p, image in zip(PROMPTS, IMAGES)]
    return request.param, model, chat.collate(encoded, IMAGES)  # a left-padded batch of two


def test_edited_path_with_zero_alpha_is_plain_generate(family):
    """PAI with alpha=0 on every layer runs our explicit attention everywhere but changes nothing."""
    _, model, inputs = family
    plain = model.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    every_layer = list(range(model.config.get_text_config().num_hidden_layers))
    for use_cache in (True, False):
        edited = generate_with_mitigation(model, {"pai": {"alpha": 0.0, "layers": every_layer}}, **inputs, **GREEDY,
                                          use_cache=use_cache, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(edited.sequences, plain.sequences)
        for ours, theirs in zip(edited.logits, plain.logits):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert model.get_decoder().config._attn_implementation == "sdpa"  # restored


def test_pai_adds_alpha_abs_score_on_image_keys(family, monkeypatch):
    _, model, inputs = family
    calls = capture_scores(monkeypatch)
    output = generate_with_mitigation(model, {"pai": {"alpha": 0.5, "layers": [1]}}, **inputs, **GREEDY)
    assert [c["layer"] for c in calls] == [1] * (output.shape[1] - inputs["input_ids"].shape[1])
    image = (inputs["input_ids"] == model.config.image_token_id).float()
    assert image.sum() > 0
    for call in calls:
        raw = call["query"] @ call["key"].transpose(2, 3) * call["scaling"]
        margin = torch.nn.functional.pad(0.5 * image, (0, raw.shape[-1] - image.shape[1]))[:, None, :]
        expected = raw.clone()
        expected[:, :, -1, :] += margin * raw[:, :, -1, :].abs()
        torch.testing.assert_close(call["scores"], expected, atol=1e-5, rtol=1e-5)


def test_pai_changes_the_answer_distribution(family):
    _, model, inputs = family
    plain = model.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    boosted = generate_with_mitigation(model, {"pai": {"alpha": 3.0}}, **inputs, **GREEDY, output_logits=True,
                                       return_dict_in_generate=True)
    assert not torch.allclose(plain.logits[0], boosted.logits[0])


def test_var_keeps_row_mass_and_moves_only_to_image_keys(family, monkeypatch):
    _, model, inputs = family
    seen = []
    redistribute = attention_edits.redistribute_sink_attention

    def spy(probs, image, sinks, rows, p, summ, rho):
        out = redistribute(probs, image, sinks, rows, p, summ, rho)
        seen.append((probs, image, sinks, out))
        return out

    monkeypatch.setattr(attention_edits, "redistribute_sink_attention", spy)
    options = {"sink_dims": [0, 5], "tau": 1.0, "summ": 0.01, "rho": 1.0, "layers": [1]}
    generate_with_mitigation(model, {"var": options}, **inputs, max_new_tokens=2, do_sample=False)
    assert len(seen) == 2  # one layer, prefill + one decode step
    assert any(not torch.equal(out, probs) for probs, _, _, out in seen)  # some rows were image-centric
    image_keys = inputs["input_ids"] == model.config.image_token_id
    for probs, image, sinks, out in seen:
        assert torch.equal(image[:, :image_keys.shape[1]], image_keys)
        assert not (sinks[:, :image_keys.shape[1]] & (inputs["attention_mask"] == 0)).any()  # padding is no sink
        torch.testing.assert_close(out.sum(-1), probs.sum(-1))
        moved = out - probs
        for b in range(probs.shape[0]):
            assert not (moved[b][..., ~image[b] & ~sinks[b]] != 0).any()  # text keys that are no sinks keep theirs
            assert (moved[b][..., sinks[b]] <= 1e-7).all()  # sinks only lose


def test_paint_runs_on_a_clip_tower_and_is_refused_with_the_reason_elsewhere(family):
    """PAINT reads the tower's class-token attention: LLaVA's CLIP has one (and the same model converted to ours
    picks the same tokens and answers alike), SigLIP and Qwen2-VL's towers have none."""
    from vlm.llava_convert import from_llava
    from vlm.mitigation.paint import select_paint_tokens
    from vlm.roles import TokenRole

    name, model, inputs = family
    spec = {"paint": {"alpha": 0.7, "beta": 0.3}}
    if name != "llava":
        with pytest.raises(ValueError, match=f"PAINT ranks patches by class-token attention; the {name} tower"):
            generate_with_mitigation(model, spec, **inputs, **GREEDY)
        return
    ours = from_llava(model)
    for picked, reference in zip(select_paint_tokens(model, inputs["pixel_values"], 0.25),
                                 select_paint_tokens(ours, inputs["pixel_values"], 0.25)):
        assert torch.equal(picked, reference)
    theirs = generate_with_mitigation(model, spec, **inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    plain = model.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    assert (theirs.logits[0] - plain.logits[0]).abs().max() > 1e-4
    # our model's PAINT on the same prompt, with the roles our processor would give its tokens
    roles = torch.full_like(inputs["input_ids"], int(TokenRole.PROMPT))
    roles[inputs["input_ids"] == model.config.image_token_id] = int(TokenRole.IMAGE)
    roles[inputs["attention_mask"] == 0] = int(TokenRole.PADDING)
    mine = ours.generate(**inputs, mm_token_type_ids=roles, **GREEDY, output_logits=True, return_dict_in_generate=True,
                         mitigation=spec)
    assert torch.equal(mine.sequences, theirs.sequences)
    for a, b in zip(mine.logits, theirs.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cost_benchmark_runs_on_a_family():
    from benchmarks.mitigation import HF_BENCH_METHODS, hf_family_costs

    rows = hf_family_costs("llava", rounds=1)
    assert [row["method"] for row in rows] == HF_BENCH_METHODS
    assert rows[0]["cost_per_token"] == 1.0 and all(row["ms_per_token"] > 0 for row in rows)


def test_vcd_scores_follow_the_formula_against_an_uncached_noised_reference(family):
    """Every step's scores are (1 + alpha) l - alpha l' with the plausibility cut, l' from an independent
    uncached forward of the noised image with the tokens generated so far."""
    from vlm.mitigation.contrastive import contrastive_logits

    name, model, batch = family
    inputs = {k: v[:1] if k != "pixel_values" or name != "qwen2_vl" else v for k, v in batch.items()}
    if name == "qwen2_vl":  # patches of both images are concatenated: keep the first image's
        first = int(batch["image_grid_thw"][0].prod())
        inputs["pixel_values"], inputs["image_grid_thw"] = batch["pixel_values"][:first], batch["image_grid_thw"][:1]
    if name == "llava" or name == "gemma3":
        inputs["pixel_values"] = batch["pixel_values"][:1]
    keep = inputs["attention_mask"][0].bool()  # drop the left padding: one row, no padding
    inputs.update({k: inputs[k][:, keep] for k in ("input_ids", "attention_mask", "token_type_ids",
                                                   "mm_token_type_ids") if k in inputs})
    options = {"alpha": 1.0, "beta": 0.1, "noise_step": 500, "seed": 0}
    out = generate_with_mitigation(model, {"vcd": options}, **inputs, max_new_tokens=3, do_sample=False,
                                   output_scores=True, output_logits=True, return_dict_in_generate=True)
    noised = {**inputs, "pixel_values": noised_alone(inputs["pixel_values"], seed=0)}
    length = inputs["input_ids"].shape[1]
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        sequence = out.sequences[:, :length + step]
        reference = model(**{**noised, "input_ids": sequence, "attention_mask": torch.ones_like(sequence),
                             **({"token_type_ids": torch.nn.functional.pad(noised["token_type_ids"], (0, step))}
                                if "token_type_ids" in noised else {}),
                             **({"mm_token_type_ids": torch.nn.functional.pad(noised["mm_token_type_ids"], (0, step))}
                                if "mm_token_type_ids" in noised else {})}).logits[:, -1]
        expected = contrastive_logits(logits, reference, 1.0, 0.1)
        finite = torch.isfinite(expected)
        assert torch.equal(finite, torch.isfinite(scores))
        torch.testing.assert_close(scores[finite], expected[finite], atol=1e-4, rtol=1e-4)



def test_pai_guidance_contrasts_with_the_prompt_without_its_image(family):
    """PAI's cfg: scores are gamma l_c + (1 - gamma) l_u with the plausibility cut, l_u from an independent forward
    of the prompt without its image tokens (and without pixels)."""
    from vlm.mitigation.contrastive import contrastive_logits

    _, model, batch = family
    out = generate_with_mitigation(model, {"pai": {"alpha": 0.0, "layers": [0], "cfg": 1.5, "cfg_beta": 0.1}},
                                   **batch, max_new_tokens=3, do_sample=False, output_scores=True,
                                   output_logits=True, return_dict_in_generate=True)
    length = batch["input_ids"].shape[1]
    for row in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][row].bool() & (batch["input_ids"][row] != model.config.image_token_id)
        prompt = batch["input_ids"][row][keep]
        for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
            sequence = torch.cat([prompt, out.sequences[row, length:length + step]])[None]
            unconditional = model(input_ids=sequence).logits[:, -1]
            expected = contrastive_logits(logits[row:row + 1], unconditional, 0.5, 0.1)
            finite = torch.isfinite(expected)
            assert torch.equal(finite, torch.isfinite(scores[row:row + 1]))
            torch.testing.assert_close(scores[row:row + 1][finite], expected[finite], atol=1e-4, rtol=1e-4)


def _last_head_outputs(model, layer: int, run) -> torch.Tensor:
    """The input of `o_proj` (the concatenated head outputs) of `layer` at the last position, while `run()` runs;
    a hook registered first sees it before any mitigation hook changes it."""
    from vlm.mitigation.model_parts import attention_module, decoder_layers

    seen = []
    hook = attention_module(decoder_layers(model)[layer]).o_proj.register_forward_pre_hook(
        lambda module, args: seen.append(args[0][:, -1].detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


def test_vhr_measures_against_the_prompt_without_its_image(family):
    from vlm.mitigation.contrastive import without_image
    from vlm.mitigation.vhr import HeadReinforcement

    _, model, inputs = family
    image = inputs["input_ids"] == model.config.image_token_id
    heads = HeadReinforcement(model, [0], alpha=2.0)
    paired = _last_head_outputs(model, 0, lambda: heads.select(dict(inputs), image))
    batch = inputs["input_ids"].shape[0]
    with torch.no_grad():
        plain = _last_head_outputs(model, 0, lambda: model(**inputs))
        free = without_image(inputs, model.config.get_text_config().pad_token_id or 0, model.config.image_token_id)
        free["position_ids"] = model._prepare_position_ids_for_generation(free["input_ids"], free)
        reference = _last_head_outputs(model, 0, lambda: model(**free))
    torch.testing.assert_close(paired[:batch], plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paired[batch:], reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, reference, atol=1e-3)  # the image matters to the heads being measured
    selected = heads.selected[0]
    heads_per_layer = model.config.get_text_config().num_attention_heads
    assert selected.shape == (batch, heads_per_layer) and 0 < selected.sum() < selected.numel()


def test_vhr_with_alpha_one_is_plain_generate_and_reinforcing_changes_the_logits(family):
    _, model, inputs = family
    plain = model.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    for use_cache in (True, False):
        same = generate_with_mitigation(model, {"vhr": {"alpha": 1.0}}, **inputs, **GREEDY, use_cache=use_cache,
                                        output_logits=True, return_dict_in_generate=True)
        assert torch.equal(same.sequences, plain.sequences)
        torch.testing.assert_close(same.logits[0], plain.logits[0], atol=1e-5, rtol=1e-5)
    cached, uncached = (generate_with_mitigation(model, "vhr", **inputs, **GREEDY, use_cache=use_cache,
                                                 output_logits=True, return_dict_in_generate=True)
                        for use_cache in (True, False))
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (cached.logits[0] - plain.logits[0]).abs().max() > 1e-4


def test_vcd_on_a_batch_equals_each_prompt_alone(family):
    from vlm.hf_models import ChatProcessor

    name, model, batch = family
    options = {"vcd": {"alpha": 1.0, "beta": 0.1}}
    together = generate_with_mitigation(model, options, **batch, **GREEDY)
    chat = ChatProcessor(tiny_hf_vlm(name, seed=2)[1])
    for index, (prompt, image) in enumerate(zip(PROMPTS, IMAGES)):
        alone = chat.collate([chat.encode_prompt([{"role": "user", "content": prompt}], [image])], [image])
        answer = generate_with_mitigation(model, options, **alone, **GREEDY)[0, alone["input_ids"].shape[1]:]
        assert torch.equal(answer, together[index, batch["input_ids"].shape[1]:]), name


DISTURBANCE, LEADING = "You are a confused object detector.", " I am sure it is there, right?"


@pytest.mark.parametrize("method", ["icd", "lqcd"])
def test_icd_and_lqcd_contrast_the_prompt_the_family_template_writes(family, method):
    """The contrast input is what the family's own processor makes of the disturbed or leading prompt, and the
    first step's scores are the contrastive formula against an independent forward of it."""
    from vlm.hf_models import ChatProcessor
    from vlm.mitigation.contrastive import contrastive_logits

    name, model, batch = family
    chat = ChatProcessor(tiny_hf_vlm(name, seed=2)[1])
    if method == "icd":
        conversations = [[{"role": "system", "content": DISTURBANCE}, {"role": "user", "content": p}] for p in PROMPTS]
        options, processor = {"icd": {"disturbance": DISTURBANCE}}, chat.processor  # the family's own processor
    else:
        conversations = [[{"role": "user", "content": p + LEADING}] for p in PROMPTS]
        options, processor = {"lqcd": {"suffix": LEADING}}, chat
    reference = chat.collate([chat.encode_prompt(c, [image]) for c, image in zip(conversations, IMAGES)], IMAGES)
    out = generate_with_mitigation(model, options, processor, **batch, max_new_tokens=1, do_sample=False,
                                   output_scores=True, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        reference["position_ids"] = model._prepare_position_ids_for_generation(reference["input_ids"], reference)
        contrast = model(**reference).logits[:, -1]
    expected = contrastive_logits(out.logits[0], contrast, 1.0, 0.1)
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(out.scores[0]))
    torch.testing.assert_close(out.scores[0][finite], expected[finite], atol=1e-4, rtol=1e-4)
    assert (out.scores[0][finite] - out.logits[0][finite]).abs().max() > 1e-4  # the contrast did something


def test_prompts_that_the_template_did_not_write_are_refused(family):
    from vlm.hf_models import ChatProcessor

    name, model, batch = family
    chat = ChatProcessor(tiny_hf_vlm(name, seed=2)[1])
    shifted = {**batch, "input_ids": batch["input_ids"].roll(1, dims=1)}
    with pytest.raises(ValueError, match="lqcd: prompt 0 is not written the way the family's chat template"):
        generate_with_mitigation(model, "lqcd", chat, **shifted, **GREEDY)


@pytest.mark.parametrize("method", ["vhr", "icd", "lqcd"])
def test_the_command_line_runs_them_on_a_saved_family_folder(tmp_path, capsys, method):
    import json

    from vlm.cli import main
    from vlm.testing import save_tiny_hf_vlm

    folder = save_tiny_hf_vlm("qwen2_vl", tmp_path / "qwen2_vl", seed=2)
    IMAGES[0].save(tmp_path / "red.png")
    code = main(["ask", "--model", str(folder), str(tmp_path / "red.png"), "Is there a star?", "--json",
                 "--max-new-tokens", "3", "--mitigation", method])
    assert code == 0
    assert "answer" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", [{"pai": {"alpha": 0.8}}, {"var": {"sink_dims": [0, 1], "tau": 1.0}}])
def test_attention_edits_without_a_cache_equal_with_one(family, spec):
    name, model, inputs = family
    runs = [generate_with_mitigation(model, spec, **inputs, **GREEDY, use_cache=use_cache, output_logits=True,
                                     return_dict_in_generate=True) for use_cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences), name
    for cached, uncached in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=1e-4)

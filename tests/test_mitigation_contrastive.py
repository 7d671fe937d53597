"""Contrastive decoding (VCD/ICD/LQCD/PAI-CFG): the formula, the plausibility cut, the cached second branch."""

import math

import pytest
import torch
from PIL import Image

from vlm.mitigation.contrastive import ContrastBranch, contrastive_logits, repeat_samples, without_image
from vlm.mitigation.lqcd import with_leading_suffix
from vlm.mitigation.vcd import diffusion_noise
from vlm.roles import TokenRole
from vlm.testing import tiny_vlm

IMAGES = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.linear_gradient("L").convert("RGB")]
PROMPTS = ["<image>\nWhat is in the picture?", "Describe <image> in detail please."]
DISTURBANCE = "You are a confused object detector."


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_vlm(seed=7)
    return model, processor, processor(images=IMAGES, text=PROMPTS)


def noised_alone(pixels: torch.Tensor, seed: int, step: int = 500) -> torch.Tensor:
    """VCD's distorted pixels as each image would get them on its own: every image (the last three dims; or one
    Qwen2-VL image's (patches, dim) tensor) noised by itself from `seed`."""
    if pixels.ndim == 2:
        return diffusion_noise(pixels, step, seed=seed)
    images = pixels.reshape(-1, 1, *pixels.shape[-3:])
    return torch.cat([diffusion_noise(image, step, seed=seed) for image in images]).reshape(pixels.shape)


def full_forward_logits(model, inputs, new_tokens):
    """Uncached logits after each prefix of `new_tokens` (B, T, V): the prompt + tokens in one forward."""
    ids = torch.cat([inputs["input_ids"], new_tokens], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], 1)
    roles = torch.cat([inputs["mm_token_type_ids"], torch.full_like(new_tokens, TokenRole.ANSWER)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=roles,
                       pixel_values=inputs.get("pixel_values")).logits
    prompt = inputs["input_ids"].shape[1]
    return logits[:, prompt - 1:prompt - 1 + new_tokens.shape[1]]


def test_formula_and_plausibility_cut_by_hand():
    logits = torch.tensor([[2.0, 1.0, -1.0, 2.0 + math.log(0.1) - 1e-3]])
    contrast = torch.tensor([[1.0, -1.0, 0.0, 0.0]])
    out = contrastive_logits(logits, contrast, alpha=0.5, beta=0.1)
    # p >= 0.1 max p  <=>  l >= max l + log 0.1 = -0.3026: tokens 0 and 1 pass, 2 and 3 are cut
    assert out[0, 0] == 1.5 * 2.0 - 0.5 * 1.0 and out[0, 1] == 1.5 * 1.0 + 0.5
    assert torch.isinf(out[0, 2:]).all() and (out[0, 2:] < 0).all()


@pytest.mark.parametrize("method", ["icd", "vcd"])
def test_generated_scores_equal_the_formula_over_two_full_forwards(tiny, method):
    model, processor, inputs = tiny
    alpha, beta = 0.7, 0.9  # the random tiny model has flat logits: a high beta makes the cut bite
    if method == "icd":
        options = {"alpha": alpha, "beta": beta, "disturbance": DISTURBANCE}
        contrast = processor(images=IMAGES, text=PROMPTS, system=DISTURBANCE)  # built independently
    else:
        options = {"alpha": alpha, "beta": beta, "noise_step": 500, "seed": 3}
        contrast = {**inputs, "pixel_values": noised_alone(inputs["pixel_values"], seed=3)}
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         mitigation={method: options}, processor=processor)
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    real = full_forward_logits(model, inputs, new_tokens)
    degraded = full_forward_logits(model, contrast, new_tokens)
    for step, scores in enumerate(out.scores):
        cut = real[:, step] < real[:, step].max(-1, keepdim=True).values + math.log(beta)
        assert cut.any() and (~cut).any()
        assert torch.equal(torch.isinf(scores), cut)
        expected = (1 + alpha) * real[:, step] - alpha * degraded[:, step]
        torch.testing.assert_close(scores[~cut], expected[~cut], atol=1e-4, rtol=1e-4)
    assert torch.equal(new_tokens, torch.stack([s.argmax(-1) for s in out.scores], 1))


def test_cached_branch_equals_uncached_rerun(tiny):
    model, processor, inputs = tiny
    contrast = without_image(inputs, processor.tokenizer.pad_token_id)
    branch = ContrastBranch(model, contrast, alpha=1.0, beta=0.1)
    tokens = torch.tensor([[5, 9, 17, 3], [40, 2, 8, 11]])
    cached = []
    for step in range(tokens.shape[1] + 1):
        cached.append(branch.contrast_logits(torch.cat([inputs["input_ids"], tokens[:, :step]], 1)))
    # one forward over the contrast prompt + all tokens (+ a dummy last one) gives the logits after every prefix
    uncached = full_forward_logits(model, contrast, torch.cat([tokens, torch.zeros_like(tokens[:, :1])], 1))
    torch.testing.assert_close(torch.stack(cached, 1), uncached, atol=1e-5, rtol=1e-5)


def test_lqcd_contrasts_the_leading_query(tiny):
    model, processor, inputs = tiny
    leading = processor(images=IMAGES, text=[p + " It is surely a star, right?" for p in PROMPTS])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         mitigation={"lqcd": {"leading": leading, "beta": 0.1}})
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    real, lead = full_forward_logits(model, inputs, new_tokens), full_forward_logits(model, leading, new_tokens)
    keep = ~torch.isinf(out.scores[0])
    torch.testing.assert_close(out.scores[0][keep], (2 * real[:, 0] - lead[:, 0])[keep], atol=1e-4, rtol=1e-4)


def test_lqcd_builds_the_leading_query_like_the_processor(tiny):
    model, processor, inputs = tiny
    suffix = " It is surely a star, right?"
    built = with_leading_suffix(inputs, processor, suffix)
    reference = processor(images=IMAGES, text=[p + suffix for p in PROMPTS])
    for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert torch.equal(built[name], reference[name])
    with_processor = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                    mitigation={"lqcd": {"suffix": suffix}}, processor=processor)
    with_leading = model.generate(**inputs, max_new_tokens=3, do_sample=False,
                                  mitigation={"lqcd": {"leading": reference}})
    assert torch.equal(with_processor, with_leading)


def test_pai_guidance_branch_is_the_text_only_prompt(tiny):
    model, processor, inputs = tiny
    gamma = 1.5
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         mitigation={"pai": {"alpha": 0.0, "cfg": gamma, "cfg_beta": 0.1}})
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    real = full_forward_logits(model, inputs, new_tokens)
    keep = ~torch.isinf(out.scores[0])
    # gamma (log p_c - log p_u) + log p_u, compared after log-softmax over the kept tokens
    conditional = real[:, 0].log_softmax(-1)
    text_only = without_image(inputs, processor.tokenizer.pad_token_id)
    unconditional = full_forward_logits(model, text_only, new_tokens)[:, 0].log_softmax(-1)
    expected = gamma * (conditional - unconditional) + unconditional
    got = out.scores[0].masked_fill(~keep, -1e9).log_softmax(-1)
    want = expected.masked_fill(~keep, -1e9).log_softmax(-1)
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)
    # the text-only prompt keeps every text token of the original, in order
    assert torch.equal(text_only["input_ids"][text_only["attention_mask"].bool()],
                       inputs["input_ids"][inputs["attention_mask"].bool() & (inputs["mm_token_type_ids"] != 3)])


def test_sampling_with_several_return_sequences(tiny):
    model, _, inputs = tiny
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2, mitigation=["vcd"])
    assert out.shape[0] == 4
    repeated = repeat_samples(dict(inputs), 2, model.num_image_tokens)
    assert torch.equal(repeated["pixel_values"][[0, 1, 2, 3]], inputs["pixel_values"][[0, 0, 1, 1]])
    assert torch.equal(repeated["input_ids"][2], inputs["input_ids"][1])


def test_beam_search_is_refused_for_contrastive_methods(tiny):
    model, _, inputs = tiny
    with pytest.raises(ValueError, match="vcd .*does not support beam search"):
        model.generate(**inputs, max_new_tokens=2, num_beams=2, mitigation=["vcd"])


def test_icd_needs_the_processor(tiny):
    model, _, inputs = tiny
    with pytest.raises(ValueError, match="icd writes its disturbance with the chat template: pass the processor"):
        model.generate(**inputs, max_new_tokens=2, mitigation=["icd"])
    with pytest.raises(ValueError, match="the processor is an argument of generate, not an option"):
        model.generate(**inputs, max_new_tokens=2, mitigation={"icd": {"processor": None}})


def test_diffusion_noise_follows_the_schedule():
    x = torch.zeros(2, 3, 4, 4)
    noised = diffusion_noise(x, step=999, seed=1)
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.prod(1 - betas)
    expected = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * float((1 - alpha_bar).sqrt())
    torch.testing.assert_close(noised, expected)
    ones = diffusion_noise(torch.ones(1, 1, 1, 1), step=0, seed=1)
    assert abs(float(ones) - math.sqrt(1 - betas[0]) - math.sqrt(betas[0]) * float(
        torch.randn(1, 1, 1, 1, generator=torch.Generator().manual_seed(1)))) < 1e-6


def test_vcd_on_a_batch_equals_each_prompt_alone(tiny):
    model, processor, inputs = tiny
    options = {"vcd": {"alpha": 1.0, "beta": 0.1}}
    together = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, mitigation=options)
    for index, (image, prompt) in enumerate(zip(IMAGES, PROMPTS)):
        alone = model.generate(**processor(images=[image], text=[prompt]), max_new_tokens=4, do_sample=False,
                               output_scores=True, return_dict_in_generate=True, mitigation=options)
        new = together.sequences[index, inputs["input_ids"].shape[1]:]
        assert torch.equal(alone.sequences[0, -4:], new)
        for ours, theirs in zip(alone.scores, together.scores):
            finite = torch.isfinite(ours[0])
            torch.testing.assert_close(ours[0][finite], theirs[index][finite], atol=1e-4, rtol=1e-4)

"""VHR, PAI, PAINT and VAR change exactly what their papers say, where they say, on tiny models."""

import pytest
import torch
from PIL import Image
from transformers.integrations.sdpa_attention import repeat_kv

from vlm import ATTENTION_MODES, VisionLanguageModel, VLMConfig, VLMProcessor
from vlm.mitigation import attention as attention_edits
from vlm.mitigation.contrastive import without_image
from vlm.mitigation.model_parts import decoder_layers
from vlm.mitigation.paint import select_paint_tokens
from vlm.roles import TokenRole
from vlm.testing import TINY_CORPUS, tiny_text_config, tiny_vlm
from vlm.tokenizer import train_tokenizer

IMAGES = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.linear_gradient("L").convert("RGB")]
PROMPTS = ["<image>\nWhat is in the picture?", "Describe <image> in detail please."]
VIT = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def deep_vlm(num_layers=4, attention_mode="causal", seed=0):
    """A tiny VLM with a `num_layers`-layer LLM (tiny_vlm's LLM has 2) and a 3-block ViT."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(TINY_CORPUS, vocab_size=256)
    config = VLMConfig(vision="vit_tiny_patch16_224", vision_kwargs=VIT, image_size=32, attention_mode=attention_mode,
                       text_config=tiny_text_config("llama", vocab_size=len(tokenizer), num_hidden_layers=num_layers),
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = VisionLanguageModel(config).eval()
    return model, VLMProcessor.from_model(model, tokenizer)


@pytest.fixture(scope="module")
def deep():
    model, processor = deep_vlm()
    return model, processor, processor(images=IMAGES, text=PROMPTS)


def o_proj(model, layer):
    return decoder_layers(model)[layer].self_attn.o_proj


# ------------------------------------------------------------------------------------------ VHR
def hand_selected_heads(with_image, without, heads):
    """VHR's rule written out per row: zero outlier VHDs (VHD and ||A(text)||^2 both > mean + std), keep > median."""
    selected = []
    for row_with, row_without in zip(with_image, without):
        a, b = row_with.view(heads, -1), row_without.view(heads, -1)
        divergence = [float((a[h] - b[h]).pow(2).sum().sqrt()) for h in range(heads)]
        activation = [float(b[h].pow(2).sum()) for h in range(heads)]

        def limit(values):
            mean = sum(values) / heads
            return mean + (sum((v - mean) ** 2 for v in values) / heads) ** 0.5

        kept = [0.0 if d > limit(divergence) and t > limit(activation) else d for d, t in zip(divergence, activation)]
        median = sorted(kept)[(heads - 1) // 2]
        selected.append([v > median for v in kept])
    return torch.tensor(selected)


def test_vhr_scales_exactly_the_selected_heads(deep):
    model, processor, inputs = deep
    layer, alpha, heads = 2, 3.0, model.config.text_config.num_attention_heads
    # independent reference: the prompt with and without its image, unmitigated, o_proj input at the last token
    captured = []
    hook = o_proj(model, layer).register_forward_pre_hook(lambda m, args: captured.append(args[0][:, -1].clone()))
    with torch.no_grad():
        model(**inputs)
        model(**without_image(inputs, processor.tokenizer.pad_token_id))
    hook.remove()
    expected = hand_selected_heads(captured[0], captured[1], heads)
    assert expected.any() and not expected.all()
    factors = 1 + (alpha - 1) * expected.float()

    before, after = [], []
    hooks = [o_proj(model, layer).register_forward_pre_hook(lambda m, args: before.append(args[0].clone())),
             o_proj(model, layer).register_forward_hook(lambda m, args, out: after.append(args[0].clone()))]
    try:
        model.generate(**inputs, max_new_tokens=3, do_sample=False,
                       mitigation={"vhr": {"layers": [layer], "alpha": alpha}})
    finally:
        for hook in hooks:
            hook.remove()
    batch = inputs["input_ids"].shape[0]
    steps = [(b, a) for b, a in zip(before, after) if b.shape[0] == batch]  # skip the 2B selection pass
    assert len(steps) == 3
    torch.testing.assert_close(steps[0][0][:, -1], captured[0], atol=1e-5, rtol=1e-5)  # prefill saw the real prompt
    for unscaled, scaled in steps:
        rows, length, width = unscaled.shape
        hand = unscaled.view(rows, length, heads, -1) * factors[:, None, :, None]
        torch.testing.assert_close(scaled, hand.view(rows, length, width), atol=0, rtol=0)


# ------------------------------------------------------------------------------------- PAI / PAINT
def capture_scores(monkeypatch):
    """Record (layer, query, key, scaling, edited pre-softmax scores) of every edited attention call."""
    calls = []
    attend, mask_scores = attention_edits.LayerEdits.attend, attention_edits._mask_scores

    def spy_attend(self, module, query, key, value, attention_mask, scaling):
        calls.append({"layer": self.layer_index, "query": query, "key": repeat_kv(key, module.num_key_value_groups),
                      "scaling": scaling})
        return attend(self, module, query, key, value, attention_mask, scaling)

    def spy_mask(scores, attention_mask):
        calls[-1]["scores"] = scores.clone()
        return mask_scores(scores, attention_mask)

    monkeypatch.setattr(attention_edits.LayerEdits, "attend", spy_attend)
    monkeypatch.setattr(attention_edits, "_mask_scores", spy_mask)
    return calls


def check_boost(calls, layers, key_margin, steps):
    assert [c["layer"] for c in calls] == layers * steps  # only the stated layers, at every step
    for call in calls:
        raw = call["query"] @ call["key"].transpose(2, 3) * call["scaling"]
        margin = key_margin[:, :raw.shape[-1]]
        margin = torch.nn.functional.pad(margin, (0, raw.shape[-1] - margin.shape[1]))[:, None, :]
        expected = raw.clone()
        expected[:, :, -1, :] += margin * raw[:, :, -1, :].abs()
        torch.testing.assert_close(call["scores"], expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(call["scores"][:, :, :-1], raw[:, :, :-1]) or raw.shape[2] == 1  # other rows untouched


def test_pai_adds_alpha_abs_score_to_image_keys_in_its_layers(deep, monkeypatch):
    model, _, inputs = deep
    calls = capture_scores(monkeypatch)
    model.generate(**inputs, max_new_tokens=3, do_sample=False, mitigation={"pai": {"alpha": 0.5, "layers": [1, 3]}})
    image = (inputs["mm_token_type_ids"] == TokenRole.IMAGE).float()
    check_boost(calls, [1, 3], 0.5 * image, steps=3)


def test_paint_adds_alpha_to_local_and_beta_to_summary_tokens(deep, monkeypatch):
    model, _, inputs = deep
    calls = capture_scores(monkeypatch)
    model.generate(**inputs, max_new_tokens=2, do_sample=False,
                   mitigation={"paint": {"alpha": 0.7, "beta": 0.4, "layers": [0, 2]}})
    local, summary = select_paint_tokens(model, inputs["pixel_values"], 0.25)
    image = inputs["mm_token_type_ids"] == TokenRole.IMAGE
    margin = torch.zeros(image.shape)
    margin[image] = (0.7 * local.float() + 0.4 * summary.float()).flatten()
    assert local.any()
    check_boost(calls, [0, 2], margin, steps=2)


def test_paint_token_selection_matches_the_towers_attention(deep):
    model, _, inputs = deep
    blocks = model.vision_tower.model.blocks
    probabilities = {}
    hooks = []
    for index in (0, len(blocks) - 2):
        blocks[index].attn.fused_attn = False  # the explicit path runs attn_drop on the probabilities
        hooks.append(blocks[index].attn.attn_drop.register_forward_hook(
            lambda m, args, out, index=index: probabilities.__setitem__(index, out)))
    try:
        with torch.no_grad():
            model.vision_tower.model.forward_features(inputs["pixel_values"])
    finally:
        for index, hook in zip((0, len(blocks) - 2), hooks):
            hook.remove()
            blocks[index].attn.fused_attn = True
    first = probabilities[0][:, :, 0, 1:].sum(1)
    last = probabilities[len(blocks) - 2][:, :, 0, 1:].sum(1)
    local, summary = select_paint_tokens(model, inputs["pixel_values"], 0.25)
    for image in range(len(first)):
        q1, q3 = last[image].quantile(0.25), last[image].quantile(0.75)
        assert torch.equal(summary[image], last[image] > q3 + 1.5 * (q3 - q1))
        top = set(first[image].argsort(descending=True)[:4].tolist())
        assert set(local[image].nonzero().flatten().tolist()) == top - set(summary[image].nonzero().flatten().tolist())


def test_paint_refuses_a_connector_that_merges_patches():
    model, processor = tiny_vlm(connector="pixel_shuffle", connector_kwargs={"factor": 2})
    with pytest.raises(ValueError, match="one LLM image token per vision token"):
        model.generate(**processor(images=IMAGES[:1], text=PROMPTS[:1]), max_new_tokens=1, mitigation=["paint"])


# ----------------------------------------------------------------------------------------- VAR
def random_attention(batch=2, heads=3, queries=4, keys=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(batch, heads, queries, keys, generator=generator).softmax(-1)
    image = torch.zeros(batch, keys, dtype=torch.bool)
    image[:, 2:7] = True
    sinks = torch.zeros(batch, keys, dtype=torch.bool)
    sinks[:, [0, 3]] = True  # one text sink (BOS-like), one visual sink
    return probs, image, sinks


def test_var_moves_sink_mass_to_non_sink_image_tokens_and_keeps_row_mass():
    probs, image, sinks = random_attention()
    rows = torch.tensor([[False, True, True, True], [True, True, False, True]])
    p, summ, rho = 0.6, 0.5, 0.5
    edited = attention_edits.redistribute_sink_attention(probs, image, sinks, rows, p, summ, rho)
    torch.testing.assert_close(edited.sum(-1), probs.sum(-1))
    non_sink_image = image & ~sinks
    for b, h, q in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4)).tolist():
        row, new = probs[b, h, q], edited[b, h, q]
        image_mass, visual_sink = row[image[b]].sum(), row[image[b] & sinks[b]].sum()
        centric = bool(rows[b, q]) and image_mass >= summ and visual_sink <= rho * image_mass
        if not centric:
            assert torch.equal(new, row)
            continue
        budget = (1 - p) * row[sinks[b]].sum()
        torch.testing.assert_close(new[sinks[b]], p * row[sinks[b]])
        share = row[non_sink_image[b]] / row[non_sink_image[b]].sum()
        torch.testing.assert_close(new[non_sink_image[b]], row[non_sink_image[b]] + budget * share)
        other = ~sinks[b] & ~image[b]
        assert torch.equal(new[other], row[other])
    assert not torch.equal(edited, probs)  # some rows were image-centric


def test_var_in_the_model_edits_only_image_centric_rows(deep, monkeypatch):
    model, _, inputs = deep
    seen = []
    redistribute = attention_edits.redistribute_sink_attention

    def spy(probs, image, sinks, rows, p, summ, rho):
        out = redistribute(probs, image, sinks, rows, p, summ, rho)
        seen.append((probs, image, sinks, rows, out))
        return out

    monkeypatch.setattr(attention_edits, "redistribute_sink_attention", spy)
    options = {"sink_dims": [0, 5], "tau": 1.0, "summ": 0.05, "layers": [1, 2]}
    model.generate(**inputs, max_new_tokens=2, do_sample=False, mitigation={"var": options})
    assert len(seen) == 4  # 2 layers x (prefill + 1 decode step)
    image_keys = inputs["mm_token_type_ids"] == TokenRole.IMAGE
    changed_rows = 0
    for probs, image, sinks, rows, out in seen:
        assert torch.equal(image[:, :image_keys.shape[1]], image_keys)
        torch.testing.assert_close(out.sum(-1), probs.sum(-1))
        changed = (out != probs).any(-1)
        if probs.shape[2] > 1:  # prefill: only text rows after the image may change
            last_image = torch.where(image_keys, torch.arange(image_keys.shape[1]), -1).amax(1)
            after = torch.arange(image_keys.shape[1])[None] > last_image[:, None]
            assert not changed[~after[:, None, :].expand_as(changed)].any()
        moved = out - probs
        for b in range(probs.shape[0]):
            gained = moved[b][..., ~sinks[b]] > 0
            assert not gained[..., ~image[b][~sinks[b]]].any()  # only non-sink image keys gain
            assert (moved[b][..., sinks[b]] <= 0).all()  # sinks only lose
        changed_rows += int(changed.sum())
    assert changed_rows > 0


# ------------------------------------------------------------------ masks of every attention mode
@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_explicit_attention_reproduces_every_mode(mode):
    """PAI with alpha=0 runs the explicit edited path in every layer but changes nothing: same logits as plain."""
    model, processor = tiny_vlm(attention_mode=mode, seed=2)
    inputs = processor(images=IMAGES, text=PROMPTS)
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    plain = model.generate(**inputs, **settings)
    edited = model.generate(**inputs, **settings, mitigation={"pai": {"alpha": 0.0, "layers": [0, 1]}})
    assert torch.equal(plain.sequences, edited.sequences)
    torch.testing.assert_close(torch.stack(edited.logits), torch.stack(plain.logits), atol=1e-5, rtol=1e-5)
    assert model.language_model.config._attn_implementation == "sdpa"

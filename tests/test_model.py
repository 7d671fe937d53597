"""The VLM core: every attention mode generates consistently, masks are live, save/load, batches, gradients."""

import pytest
import torch
from PIL import Image

from vlm import ATTENTION_MODES, VisionLanguageModel, VLMProcessor
from vlm.roles import TokenRole
from vlm.testing import tiny_vlm

IMAGES = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.linear_gradient("L").convert("RGB")]
PROMPTS = ["<image>\nWhat is in the picture?", "Describe <image> in detail please."]


def generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)


@pytest.fixture(scope="module", params=ATTENTION_MODES)
def mode_model(request):
    return tiny_vlm(attention_mode=request.param, seed=1)


def test_cached_generation_equals_uncached(mode_model):
    model, processor = mode_model
    inputs = processor(images=IMAGES, text=PROMPTS)
    cached = generate(model, inputs)
    uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_teacher_forcing_reproduces_generated_logits(mode_model):
    model, processor = mode_model
    inputs = processor(images=IMAGES, text=PROMPTS)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = out.sequences[:, prompt_length:]
    roles = torch.cat([inputs["mm_token_type_ids"], torch.full_like(new_tokens, TokenRole.ANSWER)], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, pixel_values=inputs["pixel_values"], attention_mask=mask,
                       mm_token_type_ids=roles).logits
    forced = logits[:, prompt_length - 1:-1]
    generated = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(forced, generated, atol=1e-4, rtol=1e-4)
    assert torch.equal(forced.argmax(-1), new_tokens)


def test_batch_generation_equals_per_sample(mode_model):
    model, processor = mode_model
    batched = generate(model, processor(images=IMAGES, text=PROMPTS))
    for index in range(2):
        single = generate(model, processor(images=[IMAGES[index]], text=[PROMPTS[index]]))
        new = single.shape[1] - processor(images=[IMAGES[index]], text=[PROMPTS[index]])["input_ids"].shape[1]
        assert torch.equal(batched[index, -new:], single[0, -new:])


def training_batch(processor, answer="a red circle"):
    conversation = [
        {"role": "system", "content": "You look at pictures."},
        {"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And <image>?"},
        {"role": "assistant", "content": "two stars"},
    ]
    return processor.apply_conversations([conversation], [IMAGES])


@pytest.mark.parametrize("mode", [m for m in ATTENTION_MODES if m != "causal"])
def test_non_causal_modes_change_the_logits(mode):
    causal, processor = tiny_vlm(attention_mode="causal", seed=3)
    other, _ = tiny_vlm(attention_mode=mode, seed=3)
    batch = training_batch(processor)
    with torch.no_grad():
        assert not torch.allclose(causal(**batch).logits, other(**batch).logits, atol=1e-4)


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_answer_tokens_never_reach_image_states(mode):
    model, processor = tiny_vlm(attention_mode=mode, seed=4)
    batch = training_batch(processor)
    perturbed = {k: v.clone() for k, v in batch.items()}
    answer_positions = (batch["mm_token_type_ids"] == TokenRole.ANSWER).nonzero()
    row, col = answer_positions[0]
    perturbed["input_ids"][row, col] = (batch["input_ids"][row, col] + 7) % 200
    # the image tokens before the answer (those after it may see it causally, as text does)
    image = batch["mm_token_type_ids"] == TokenRole.IMAGE
    image[:, col:] = False
    assert image.sum() == model.num_image_tokens
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
        states_perturbed = model(**perturbed, output_hidden_states=True).hidden_states
    for layer, layer_perturbed in zip(states, states_perturbed):
        assert torch.equal(layer[image], layer_perturbed[image])
    assert not torch.equal(states[-1], states_perturbed[-1])  # the perturbation is real


def test_save_load_round_trip(tmp_path):
    model, processor = tiny_vlm(attention_mode="modality_mutual", connector="perceiver",
                                connector_kwargs={"num_latents": 4, "depth": 1, "num_heads": 2})
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    loaded_processor = VLMProcessor.from_pretrained(tmp_path)
    inputs = processor(images=IMAGES, text=PROMPTS)
    assert torch.equal(inputs["input_ids"], loaded_processor(images=IMAGES, text=PROMPTS)["input_ids"])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert torch.equal(generate(model, inputs), generate(loaded, inputs))


def test_pretrained_llm_round_trip(tmp_path):
    """A VLM on a pretrained LLM folder whose vocabulary lacks the image token: it grows by one at build time,
    and the saved folder must say so (a stale text_config.vocab_size made from_pretrained resize on meta tensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlm import VLMConfig
    from vlm.testing import save_tiny_pretrained_llm

    llm_dir = save_tiny_pretrained_llm(tmp_path / "llm")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    vocab = len(tokenizer)
    config = VLMConfig(vision="vit_tiny_patch16_224", text_config=str(llm_dir),
                       vision_kwargs=dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2))
    model = VisionLanguageModel(config).eval()
    processor = VLMProcessor.from_model(model, tokenizer)
    assert processor.image_token_id == vocab and model.get_input_embeddings().num_embeddings == vocab + 1
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    assert torch.equal(model.get_input_embeddings().weight[:vocab], llm.get_input_embeddings().weight)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")

    loaded = VisionLanguageModel.from_pretrained(tmp_path / "vlm").eval()
    assert loaded.config.text_config.vocab_size == vocab + 1
    inputs = processor(images=IMAGES, text=PROMPTS)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    assert torch.equal(generate(model, inputs), generate(loaded, inputs))


def test_auto_classes_resolve_the_model(tmp_path):
    from transformers import AutoConfig, AutoModel

    model, _ = tiny_vlm()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "vlm"
    assert isinstance(AutoModel.from_pretrained(tmp_path), VisionLanguageModel)


@pytest.mark.parametrize("llm", ["llama", "qwen2", "qwen3", "phi3", "gemma"])
def test_llm_families(llm):
    model, processor = tiny_vlm(attention_mode="modality_mutual+bidirectional_visual", llm=llm)
    inputs = processor(images=IMAGES, text=PROMPTS)
    assert torch.equal(generate(model, inputs), generate(model, inputs, use_cache=False))


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_gradients_reach_the_trainable_parts(freeze_vision):
    model, processor = tiny_vlm(attention_mode="modality_mutual", freeze_vision=freeze_vision)
    model.train()
    loss = model(**training_batch(processor)).loss
    loss.backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(model.connector) and has_grad(model.language_model)
    assert has_grad(model.vision_tower) != freeze_vision


@pytest.mark.parametrize(
    "connector, kwargs, tokens",
    [("linear", {}, 16), ("mlp2x_gelu", {}, 16), ("pixel_shuffle", {"factor": 2}, 4),
     ("perceiver", {"num_latents": 5, "depth": 1, "num_heads": 2}, 5)],
)
def test_connectors_state_their_token_count(connector, kwargs, tokens):
    model, processor = tiny_vlm(connector=connector, connector_kwargs=kwargs)
    assert model.num_image_tokens == tokens == processor.num_image_tokens
    features = model.get_image_features(processor.preprocess_images(IMAGES))
    assert features.shape == (2, tokens, model.config.text_config.hidden_size)


def test_earlier_layer_and_prefix_tokens():
    model, _ = tiny_vlm(vision_feature_layer=0, vision_keep_prefix_tokens=True)
    assert model.num_image_tokens == 16 + 1  # CLS kept
    last, _ = tiny_vlm(vision_feature_layer=-1)
    assert last.num_image_tokens == 16


def test_hierarchical_tower_is_flattened():
    model, processor = tiny_vlm(vision="davit_tiny", vision_kwargs={"embed_dims": (16, 32, 64, 128), "num_heads": (1, 2, 4, 8),
                                                                     "depths": (1, 1, 1, 1)}, image_size=64)
    assert model.num_image_tokens == 4  # a 2x2 map at 64 px
    inputs = processor(images=IMAGES, text=PROMPTS)
    assert generate(model, inputs).shape[0] == 2


# ----------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small():
    return tiny_vlm()


def test_wrong_number_of_images(small):
    _, processor = small
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        processor(images=[IMAGES[0]], text=["<image> and <image>"])


def test_wrong_image_mode(small):
    _, processor = small
    with pytest.raises(ValueError, match="mode 'RGBA'"):
        processor(images=[Image.new("RGBA", (8, 8))], text=["<image> hi"])


def test_wrong_pixel_size(small):
    model, processor = small
    inputs = processor(images=[IMAGES[0]], text=[PROMPTS[0]])
    inputs["pixel_values"] = torch.zeros(1, 3, 48, 48)
    with pytest.raises(ValueError, match=r"\(num_images, 3, 32, 32\)"):
        model(**inputs)


def test_empty_prompt(small):
    _, processor = small
    with pytest.raises(ValueError, match="prompt is empty"):
        processor(images=[IMAGES[0]], text=["<image>  "])


def test_prompt_longer_than_context(small):
    _, processor = small
    with pytest.raises(ValueError, match="more than the LLM's context of 512"):
        processor(text=["circle " * 600])


def test_hidden_size_mismatch_without_connector():
    with pytest.raises(ValueError, match="connector='identity' needs equal widths"):
        tiny_vlm(connector="identity")


def test_flash_attention_refused_for_non_causal_modes():
    with pytest.raises(ValueError, match="flash_attention_2 ignores"):
        tiny_vlm(attention_mode="modality_mutual", attn_implementation="flash_attention_2")


def test_missing_roles_for_non_causal_mode(small):
    model, processor = tiny_vlm(attention_mode="prefix")
    inputs = processor(images=[IMAGES[0]], text=[PROMPTS[0]])
    del inputs["mm_token_type_ids"]
    with pytest.raises(ValueError, match="needs token roles"):
        model(**inputs)


@pytest.mark.parametrize("mode", ["modality_mutual+bidirectional_visual", "prefix"])
def test_eager_backend_matches_sdpa(mode):
    sdpa, processor = tiny_vlm(attention_mode=mode, seed=5)
    eager, _ = tiny_vlm(attention_mode=mode, seed=5, attn_implementation="eager")
    inputs = processor(images=IMAGES, text=PROMPTS)
    with torch.no_grad():
        real = inputs["attention_mask"].bool()  # padding positions hold backend-specific garbage
        torch.testing.assert_close(sdpa(**inputs).logits[real], eager(**inputs).logits[real], atol=1e-5, rtol=1e-4)
    assert torch.equal(generate(eager, inputs), generate(eager, inputs, use_cache=False))


def test_a_timm_instance_as_the_tower(tmp_path):
    import timm

    from vlm import VLMConfig
    from vlm.testing import tiny_text_config

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    tower = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
    config = VLMConfig(vision="vit_tiny_patch16_224", vision_kwargs=kwargs, text_config=tiny_text_config(), image_token_id=5)
    model = VisionLanguageModel(config, vision_model=tower).eval()
    assert model.vision_tower.model is tower
    pixels = torch.randn(1, 3, 32, 32)
    model.save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model.get_image_features(pixels), loaded.get_image_features(pixels))
    with pytest.raises(ValueError, match="vision_model is a davit_tiny"):
        VisionLanguageModel(config, vision_model=timm.create_model("davit_tiny", num_classes=0))


def test_the_image_placeholder_is_never_generated(tmp_path):
    """A model that would write the image placeholder (here forced by a large logit) does not, so the next step
    is never asked for an image; the setting travels with the saved model."""
    model, processor = tiny_vlm(seed=1)
    image_token = processor.image_token_id
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, logits: logits.index_add(-1, torch.tensor([image_token]),
                                                      torch.full((*logits.shape[:-1], 1), 100.0)))
    inputs = processor(images=[Image.new("RGB", (32, 32), "red")], text=["<image>\nWhat is it?"])
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    hook.remove()
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4
    assert image_token not in output[0, inputs["input_ids"].shape[1]:].tolist()
    model.save_pretrained(tmp_path)
    assert image_token in VisionLanguageModel.from_pretrained(tmp_path).generation_config.suppress_tokens

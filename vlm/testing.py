"""Tiny random-initialised models for tests, examples and the offline demo (nothing is downloaded)."""

from transformers import AutoConfig, PreTrainedTokenizerFast

from .config import VLMConfig
from .modeling import VisionLanguageModel
from .processing import IMAGE_MARKER, VLMProcessor
from .tokenizer import train_tokenizer

TINY_CORPUS = [
    "a red circle and a blue square on a white background",
    "is there a star in the image? yes. no. how many hearts are there? two. three.",
    "describe the image in detail. there is a green triangle to the left of a yellow moon.",
    "what colour is the cross? it is purple. the picture shows one orange diamond.",
]

TINY_TEXT_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
}


def tiny_text_config(family: str = "llama", vocab_size: int = 256, attn_implementation: str = "sdpa", **overrides):
    settings = {**TINY_TEXT_CONFIGS[family], "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(settings.pop("model_type"), attn_implementation=attn_implementation, **settings)


def save_tiny_pretrained_llm(folder, family: str = "llama", seed: int = 0):
    """A tiny random causal LM and its tokenizer saved as a pretrained LLM folder (as a hub download looks):
    a text-only tokenizer, so building a VLM on it adds `<image>` and grows the vocabulary by one."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(TINY_CORPUS, vocab_size=256, image_token=False)
    llm = AutoModelForCausalLM.from_config(tiny_text_config(family, vocab_size=len(tokenizer)))
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_vlm(attention_mode: str = "causal", llm: str = "llama", vision: str = "vit_tiny_patch16_224",
             vision_kwargs: dict | None = None, connector: str = "mlp2x_gelu", connector_kwargs: dict | None = None,
             image_size: int = 32, attn_implementation: str = "sdpa", corpus=None, seed: int = 0,
             text_overrides: dict | None = None, **config_kwargs):
    """A tiny (model, processor) pair: a small vision tower at `image_size`, a 2-layer LLM (`text_overrides`
    change its config, e.g. `{"num_hidden_layers": 3}`), an offline tokenizer."""
    import torch

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus or TINY_CORPUS, vocab_size=256)
    if vision_kwargs is None:
        vision_kwargs = {"img_size": image_size}
        if vision.startswith("vit_"):
            vision_kwargs.update(patch_size=8, depth=2, embed_dim=32, num_heads=2)
    config = VLMConfig(
        vision=vision, vision_kwargs=vision_kwargs, connector=connector, connector_kwargs=connector_kwargs,
        text_config=tiny_text_config(llm, vocab_size=len(tokenizer), **(text_overrides or {})),
        attn_implementation=attn_implementation,
        attention_mode=attention_mode, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_MARKER),
        image_size=image_size, **config_kwargs,
    )
    model = VisionLanguageModel(config).eval()
    return model, VLMProcessor.from_model(model, tokenizer)


# ------------------------------------------------------------------ tiny Hugging Face VLM families
# Each builder makes a random-init model of one family with the family's own classes, an offline BPE tokenizer
# carrying the family's special tokens and a chat template written like the family's released one. The `<image>`
# of the LLaVA and Idefics3 builders is those families' own image token, not the suite's `IMAGE_MARKER` (which
# `ChatProcessor` turns into the `{"type": "image"}` parts these templates render), so it stays written out.
_CONTENT = ("{% for part in message['content'] %}{% if part['type'] == 'image' %}IMAGE"
            "{% else %}{{ part['text'] }}{% endif %}{% endfor %}")
_TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=8)


def _family_tokenizer(special_tokens: list[str], chat_template: str, **tokens) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TINY_CORPUS + ["USER: ASSISTANT: User: Assistant: user model assistant"],
                                  trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=chat_template, **tokens)


def _tiny_llava():
    """LLaVA-1.5 (`llava-hf` layout): CLIP tower, penultimate layer without CLS, 2-layer MLP, Llama."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    template = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: "
                + _CONTENT.replace("IMAGE", "<image>\n") + " {% elif message['role'] == 'system' %}"
                + _CONTENT + " {% else %}ASSISTANT: "
                + _CONTENT.replace("IMAGE", "") + "</s>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    tokenizer = _family_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], template, bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**_TINY_VISION, projection_dim=32),
                         text_config=LlamaConfig(**_TINY_LLAMA, vocab_size=len(tokenizer)),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=16)
    return LlavaForConditionalGeneration(config), processor


def _tiny_qwen2_vl():
    """Qwen2-VL: native-resolution ViT with 2x2 patch merging, M-RoPE Qwen2 decoder, ChatML."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                + _CONTENT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = _family_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                   "<|image_pad|>", "<|video_pad|>"], template, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=48 * 48)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=template)
    config = Qwen2VLConfig(
        text_config={**_TINY_LLAMA, "vocab_size": len(tokenizer), "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}},
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    return Qwen2VLForConditionalGeneration(config), processor


def _tiny_idefics3():
    """Idefics3 / SmolVLM: SigLIP tower, pixel-shuffle connector, Llama; `User:` / `Assistant:` turns."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, LlamaConfig)

    template = ("<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
                + _CONTENT.replace("IMAGE", "<image>") + "<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}")
    tokenizer = _family_tokenizer(["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
                                   "<fake_token_around_image>", "<global-img>"], template,
                                  eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32},
                                             max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=template)  # adds the <row_i_col_j> tokens to the tokenizer
    config = Idefics3Config(vision_config=_TINY_VISION, text_config=LlamaConfig(**_TINY_LLAMA, vocab_size=len(tokenizer)),
                            scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    return Idefics3ForConditionalGeneration(config), processor


def _tiny_gemma3():
    """Gemma 3: SigLIP tower pooled to a fixed token count, Gemma 3 decoder (sliding-window layers)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    template = ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
                "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
                + _CONTENT.replace("IMAGE", "<start_of_image>") + "<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    tokenizer = _family_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
         "<image_soft_token>"], template, bos_token="<bos>", eos_token="<end_of_turn>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                 "image_token": "<image_soft_token>"})
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}),
                                tokenizer=tokenizer, image_seq_length=4, chat_template=template)
    config = Gemma3Config(
        text_config={**_TINY_LLAMA, "head_dim": 16, "vocab_size": len(tokenizer), "sliding_window": 64},
        vision_config=_TINY_VISION, mm_tokens_per_image=4,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"))
    return Gemma3ForConditionalGeneration(config), processor


TINY_HF_FAMILIES = {"llava": _tiny_llava, "qwen2_vl": _tiny_qwen2_vl, "idefics3": _tiny_idefics3,
                    "gemma3": _tiny_gemma3}


def tiny_hf_vlm(family: str, seed: int = 0):
    """A tiny random `(model, processor)` of a Hugging Face VLM family (a key of `TINY_HF_FAMILIES`)."""
    import torch

    torch.manual_seed(seed)
    model, processor = TINY_HF_FAMILIES[family]()
    tokenizer = processor.tokenizer
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def save_tiny_hf_vlm(family: str, folder, seed: int = 0):
    """`tiny_hf_vlm` saved as a hub download looks: model, generation config and processor in one folder."""
    model, processor = tiny_hf_vlm(family, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

"""Tiny random-initialised models for tests, examples and the offline demo (nothing is downloaded)."""

from transformers import AutoConfig

from .config import VLMConfig
from .modeling import VisionLanguageModel
from .processing import VLMProcessor
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
             image_size: int = 32, attn_implementation: str = "sdpa", corpus=None, seed: int = 0, **config_kwargs):
    """A tiny (model, processor) pair: a small vision tower at `image_size`, a 2-layer LLM, an offline tokenizer."""
    import torch

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(corpus or TINY_CORPUS, vocab_size=256)
    if vision_kwargs is None:
        vision_kwargs = {"img_size": image_size}
        if vision.startswith("vit_"):
            vision_kwargs.update(patch_size=8, depth=2, embed_dim=32, num_heads=2)
    config = VLMConfig(
        vision=vision, vision_kwargs=vision_kwargs, connector=connector, connector_kwargs=connector_kwargs,
        text_config=tiny_text_config(llm, vocab_size=len(tokenizer)), attn_implementation=attn_implementation,
        attention_mode=attention_mode, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_size=image_size, **config_kwargs,
    )
    model = VisionLanguageModel(config).eval()
    return model, VLMProcessor.from_model(model, tokenizer)

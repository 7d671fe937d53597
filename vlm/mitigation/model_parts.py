"""Where the mitigation methods reach into a model: its decoder layers, their attention modules, the image-token
positions of an input, the forward arguments a hook sees, and which methods a model supports.

Two kinds of model are served. A `VisionLanguageModel` carries token roles (`mm_token_type_ids`) and a timm
tower. A Hugging Face image-text-to-text model (Llava, Qwen2-VL, Idefics3, Gemma 3, ...) is reached through what all of them share: `get_decoder()` gives the text decoder, whose layers hold a
`self_attn` with an `o_proj` that calls transformers' attention interface, and image tokens are the positions
of `config.image_token_id`. Its processor's own `mm_token_type_ids` (Qwen2-VL's) are not roles and are ignored.
"""

import torch

from ..config import VLMConfig
from ..roles import TokenRole


def is_suite_model(model) -> bool:
    """A `VisionLanguageModel` (also inside a PEFT wrapper, which passes its `config` through)."""
    return isinstance(getattr(model, "config", None), VLMConfig)


def text_decoder(model):
    """The decoder stack (`layers`, `config`, `set_attn_implementation`) of the LLM."""
    decoder = (model.language_model if is_suite_model(model) else model).get_decoder()
    if getattr(decoder, "layers", None) is None:
        raise ValueError(f"{type(decoder).__name__} has no `layers`: mitigation needs a standard HF decoder")
    return decoder


def decoder_layers(model) -> list:
    return list(text_decoder(model).layers)


def attention_module(layer):
    """The self-attention module of a decoder layer (`self_attn` with an `o_proj`, as in Llama/Qwen/Phi/Gemma)."""
    attention = getattr(layer, "self_attn", None)
    if attention is None or not hasattr(attention, "o_proj"):
        raise ValueError(f"{type(layer).__name__} has no self_attn.o_proj: mitigation cannot reach its heads")
    return attention


def num_heads(model) -> int:
    return model.config.get_text_config().num_attention_heads


def hidden_size(model) -> int:
    return model.config.get_text_config().hidden_size


def image_positions(model, input_ids: torch.Tensor | None, roles: torch.Tensor | None) -> torch.Tensor:
    """(B, L) bool: the image-token positions, from the roles when given, else from the placeholder id."""
    if roles is not None:
        return roles == TokenRole.IMAGE
    if input_ids is None:
        raise ValueError("mitigation needs input_ids or mm_token_type_ids to find the image tokens")
    return input_ids == model.config.image_token_id


def forward_arguments(model, args: tuple, kwargs: dict) -> dict:
    """The named inputs of a model's forward call, as a forward pre-hook sees them (roles: ours only)."""
    names = ("input_ids", "pixel_values", "attention_mask", "mm_token_type_ids")
    named = dict.fromkeys(names)
    if is_suite_model(model):
        named.update(zip(names, args))
    named.update({name: kwargs[name] for name in names if name in kwargs})
    if not is_suite_model(model):
        named["mm_token_type_ids"] = None
    named["cache"] = kwargs.get("cache", kwargs.get("past_key_values"))
    return named


def cached_length(cache) -> int:
    return cache.get_seq_length() if cache is not None else 0


def pad_keys(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A (B, L0) per-key mask recorded at prefill, cut or padded with False to `length` keys (decode steps
    add generated tokens, which are never image tokens or sinks)."""
    if mask.shape[1] >= length:
        return mask[:, :length]
    return torch.nn.functional.pad(mask, (0, length - mask.shape[1]), value=False)

"""Where the mitigation methods reach into a `VisionLanguageModel`: its decoder layers, their attention
modules, the image-token positions of an input, and the forward arguments a hook sees."""

import torch

from ..roles import TokenRole


def decoder_layers(model) -> list:
    """The LLM's decoder layers (every Hugging Face causal LM exposes them as `get_decoder().layers`)."""
    decoder = model.language_model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(decoder).__name__} has no `layers`: mitigation needs a standard HF decoder")
    return list(layers)


def attention_module(layer):
    """The self-attention module of a decoder layer (`self_attn` with an `o_proj`, as in Llama/Qwen/Phi/Gemma)."""
    attention = getattr(layer, "self_attn", None)
    if attention is None or not hasattr(attention, "o_proj"):
        raise ValueError(f"{type(layer).__name__} has no self_attn.o_proj: mitigation cannot reach its heads")
    return attention


def num_heads(model) -> int:
    return model.config.text_config.num_attention_heads


def image_positions(model, input_ids: torch.Tensor | None, roles: torch.Tensor | None) -> torch.Tensor:
    """(B, L) bool: the image-token positions, from the roles when given, else from the placeholder id."""
    if roles is not None:
        return roles == TokenRole.IMAGE
    if input_ids is None:
        raise ValueError("mitigation needs input_ids or mm_token_type_ids to find the image tokens")
    return input_ids == model.config.image_token_id


def forward_arguments(args: tuple, kwargs: dict) -> dict:
    """The named inputs of a `VisionLanguageModel.forward` call, as a forward pre-hook sees them."""
    names = ("input_ids", "pixel_values", "attention_mask", "mm_token_type_ids")
    named = dict(zip(names, args))
    named.update({name: kwargs[name] for name in names if name in kwargs})
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

"""Attention-mask modes built from token roles.

Every mode is "causal, plus some extra (query, key) pairs": the extra pairs are computed here as a
boolean (B, L, L) matrix and handed to transformers' `create_causal_mask` as an `or_mask_function`,
so one code path produces the right form for each attention backend (bool for SDPA, additive float
for eager, a BlockMask for flex) and padding is applied by transformers.

Modes:
    causal                                 plain causal attention.
    bidirectional_visual                   tokens of the same image see each other both ways (Croc's idea).
    modality_mutual                        image tokens also see the prompt text after them, up to the
                                           start of the next answer, never answer tokens (AKI).
    modality_mutual+bidirectional_visual   both.
    prefix                                 everything before the first answer token sees everything
                                           before it (PaliGemma-style prefix-LM; what Croc's code does).

All extra pairs point from non-answer queries to non-answer keys that precede the first answer after
them, so keys/values computed at prefill are the same in training and in cached generation.
"""

import torch

from .roles import TokenRole

ATTENTION_MODE_DESCRIPTIONS = {
    "causal": "plain causal attention (LLaVA)",
    "bidirectional_visual": "tokens of one image see each other both ways (Croc)",
    "modality_mutual": "image tokens also see the prompt after them, never the answer (AKI)",
    "modality_mutual+bidirectional_visual": "both of the above",
    "prefix": "everything before the first answer sees everything before it (PaliGemma's prefix-LM)",
}
ATTENTION_MODES = tuple(ATTENTION_MODE_DESCRIPTIONS)


def check_attention_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode={mode!r} is not one of {ATTENTION_MODES}")
    return mode


def image_block_ids(roles: torch.Tensor, tokens_per_image: int | None = None) -> torch.Tensor:
    """Number the images of each row (ids 0, 1, ...; other tokens -1). With `tokens_per_image` (the model's
    connector output count) every image's own tokens form a block, also when images sit side by side
    (`<image><image>`); without it each contiguous run of IMAGE tokens is one block."""
    is_image = roles == TokenRole.IMAGE
    if tokens_per_image:
        block = torch.div(is_image.long().cumsum(dim=1) - 1, tokens_per_image, rounding_mode="floor")
    else:
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        block = starts.long().cumsum(dim=1) - 1
    return torch.where(is_image, block, torch.full_like(block, -1))


def next_answer_index(roles: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the first ANSWER token at or after it (L when there is none)."""
    length = roles.shape[1]
    positions = torch.arange(length, device=roles.device).expand_as(roles)
    candidate = torch.where(roles == TokenRole.ANSWER, positions, torch.full_like(positions, length))
    # reverse cumulative minimum
    return candidate.flip(1).cummin(dim=1).values.flip(1)


def extra_visibility(roles: torch.Tensor, mode: str, tokens_per_image: int | None = None) -> torch.Tensor | None:
    """Boolean (B, L, L) matrix of (query, key) pairs a mode allows on top of causal attention, or None."""
    check_attention_mode(mode)
    if mode == "causal":
        return None
    batch, length = roles.shape
    extra = torch.zeros(batch, length, length, dtype=torch.bool, device=roles.device)
    query_role, key_role = roles[:, :, None], roles[:, None, :]
    if "bidirectional_visual" in mode:
        block = image_block_ids(roles, tokens_per_image)
        extra |= (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    if "modality_mutual" in mode:
        positions = torch.arange(length, device=roles.device)
        window_end = next_answer_index(roles)[:, :, None]
        extra |= (
            (query_role == TokenRole.IMAGE)
            & (key_role == TokenRole.PROMPT)
            & (positions[None, None, :] < window_end)
        )
    if mode == "prefix":
        is_answer = roles == TokenRole.ANSWER
        first_answer = torch.where(is_answer.any(1), is_answer.float().argmax(1), torch.full_like(roles[:, 0], length))
        in_prefix = torch.arange(length, device=roles.device)[None, :] < first_answer[:, None]
        extra |= in_prefix[:, :, None] & in_prefix[:, None, :]
    not_padding = roles != TokenRole.PADDING
    return extra & not_padding[:, :, None] & not_padding[:, None, :]


def allowed_pairs(roles: torch.Tensor, attention_mask: torch.Tensor, mode: str,
                  tokens_per_image: int | None = None) -> torch.Tensor:
    """The full boolean (B, L, L) matrix of which query may see which key: the reference picture of a mode.

    Used by tests and plots; the model itself goes through `build_attention_mask`.
    """
    length = roles.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=roles.device).tril()
    allowed = causal.expand(roles.shape[0], length, length).clone()
    extra = extra_visibility(roles, mode, tokens_per_image)
    if extra is not None:
        allowed |= extra
    return allowed & attention_mask.bool()[:, None, :]


def build_attention_mask(text_config, inputs_embeds, attention_mask, roles, mode, tokens_per_image: int | None = None):
    """The attention mask a Hugging Face decoder gets for a prefill in `mode` (`tokens_per_image`: see
    `image_block_ids`).

    Returns None for plain causal (the decoder builds its own), else what `create_causal_mask` returns
    for the decoder's attention backend; for decoders with sliding-window layers, a dict keyed by layer
    type, as transformers' hybrid models expect.
    """
    extra = extra_visibility(roles, mode, tokens_per_image)
    if extra is None:
        return None
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    def or_mask(batch_idx, head_idx, q_idx, kv_idx):
        return extra[batch_idx, q_idx, kv_idx]

    kwargs = dict(
        config=text_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=None,
        or_mask_function=or_mask,
    )
    full = create_causal_mask(**kwargs)
    layer_types = getattr(text_config, "layer_types", None) or []
    if "sliding_attention" not in layer_types:
        return full
    return {"full_attention": full, "sliding_attention": create_sliding_window_causal_mask(**kwargs)}

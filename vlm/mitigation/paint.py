"""PAINT's dual-stream choice of image tokens, from the vision tower's own class-token attention.

- *local* tokens: the top `local_ratio` of patches by CLS->patch attention (summed over heads) in the
  tower's first block: patches the tower looks at for fine detail;
- *summary* tokens: patches whose CLS->patch attention in the penultimate block is an outlier
  (above Q3 + 1.5 IQR): patches that gather global information;
- local tokens exclude summary tokens.
(`hasanar1f/PAINT: clip_encoder.py::update_modpai_alpha`.) This needs a ViT-style timm tower with a
class token whose patches reach the LLM one-to-one (a linear or MLP connector).
"""

import torch


def _check_tower(model):
    tower = model.vision_tower
    blocks = getattr(tower.model, "blocks", None)
    if blocks is None or len(blocks) < 2 or not hasattr(getattr(blocks[0], "attn", None), "qkv"):
        raise ValueError(f"PAINT needs a ViT-style timm tower with attention blocks (blocks[i].attn.qkv); "
                         f"{model.config.vision!r} has none")
    if getattr(tower.model, "cls_token", None) is None:
        raise ValueError(f"PAINT ranks patches by class-token attention; {model.config.vision!r} has no class token")
    if model.num_image_tokens != model.config.vision_num_tokens:
        raise ValueError(f"PAINT needs one LLM image token per vision token, but the {model.config.connector!r} "
                         f"connector maps {model.config.vision_num_tokens} vision tokens to {model.num_image_tokens}")
    return blocks


def class_token_attention(attention_module, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(N, T, C) input of a timm `Attention` -> (N, num_patches) CLS->patch attention summed over heads."""
    batch, length, _ = tokens.shape
    qkv = attention_module.qkv(tokens).reshape(batch, length, 3, attention_module.num_heads, -1).permute(2, 0, 3, 1, 4)
    query, key = attention_module.q_norm(qkv[0]), attention_module.k_norm(qkv[1])
    probs = torch.softmax((query[:, :, :1] * attention_module.scale) @ key.transpose(-2, -1), dim=-1)
    return probs[:, :, 0, num_prefix_tokens:].sum(dim=1)


def select_paint_tokens(model, pixel_values: torch.Tensor, local_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_images, num_image_tokens) bool masks (local, summary) in the order the LLM receives the tokens."""
    blocks = _check_tower(model)
    tower = model.vision_tower
    inputs = {}
    hooks = [blocks[index].attn.register_forward_pre_hook(
        lambda module, args, index=index: inputs.__setitem__(index, args[0]))
        for index in (0, len(blocks) - 2)]
    try:
        with torch.no_grad():
            tower.model.forward_features(pixel_values.to(next(tower.parameters()).dtype))
            first = class_token_attention(blocks[0].attn, inputs[0], tower.num_prefix_tokens)
            penultimate = class_token_attention(blocks[-2].attn, inputs[len(blocks) - 2], tower.num_prefix_tokens)
    finally:
        for hook in hooks:
            hook.remove()
    q1 = torch.quantile(penultimate, 0.25, dim=1, keepdim=True)
    q3 = torch.quantile(penultimate, 0.75, dim=1, keepdim=True)
    summary = penultimate > q3 + 1.5 * (q3 - q1)
    count = max(1, round(local_ratio * first.shape[1]))
    top = first.topk(count, dim=1).indices
    local = torch.zeros_like(summary).scatter_(1, top, True) & ~summary
    if tower.keep_prefix_tokens and tower.num_prefix_tokens:
        prefix = torch.zeros(local.shape[0], tower.num_prefix_tokens, dtype=torch.bool, device=local.device)
        local, summary = torch.cat([prefix, local], 1), torch.cat([prefix, summary], 1)
    return local, summary

"""PAINT's dual-stream choice of image tokens, from the vision tower's own class-token attention.

- *local* tokens: the top `local_ratio` of patches by CLS->patch attention (summed over heads) in the
  tower's first block: patches the tower looks at for fine detail;
- *summary* tokens: patches whose CLS->patch attention in the penultimate block is an outlier
  (above Q3 + 1.5 IQR): patches that gather global information;
- local tokens exclude summary tokens.
(`hasanar1f/PAINT: clip_encoder.py::update_modpai_alpha`.) This needs a ViT-style tower with a class token
whose patches reach the LLM one-to-one: a timm tower behind a linear or MLP connector, or on a Hugging Face VLM
a CLIP tower whose patch tokens are the image tokens (LLaVA-1.5; SigLIP towers have no class token).
"""

import torch

from .model_parts import decoder_layers, is_suite_model, num_heads
from .pai import install_boost
from .registry import Method, llava_depth_layers, register


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


def check_paint_tower(model) -> None:
    """Raise ValueError, naming the reason, when PAINT cannot read `model`'s tower."""
    if is_suite_model(model):
        _check_tower(model)
    else:
        _check_hf_tower(model)


def class_token_attention(attention_module, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(N, T, C) input of a timm `Attention` -> (N, num_patches) CLS->patch attention summed over heads."""
    batch, length, _ = tokens.shape
    qkv = attention_module.qkv(tokens).reshape(batch, length, 3, attention_module.num_heads, -1).permute(2, 0, 3, 1, 4)
    query, key = attention_module.q_norm(qkv[0]), attention_module.k_norm(qkv[1])
    probs = torch.softmax((query[:, :, :1] * attention_module.scale) @ key.transpose(-2, -1), dim=-1)
    return probs[:, :, 0, num_prefix_tokens:].sum(dim=1)


def _check_hf_tower(model):
    """`(tower, layers)`: the CLIP tower of a Hugging Face VLM whose patch tokens are its image tokens."""
    config, inner = model.config, getattr(model, "model", model)
    tower = next((getattr(inner, name) for name in ("vision_tower", "visual", "vision_model") if hasattr(inner, name)),
                 None)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if layers is None or not hasattr(getattr(tower, "embeddings", None), "class_embedding") or len(layers) < 2:
        raise ValueError(f"PAINT ranks patches by class-token attention; the {config.model_type} tower "
                         f"({type(tower).__name__}) has no class token")
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", None) != "default" or config.image_seq_length != patches:
        raise ValueError(f"PAINT needs one image token per patch; this {config.model_type} model gives "
                         f"{config.image_seq_length} image tokens for {patches} patches")
    return tower, layers


def hf_class_token_attention(attention, hidden: torch.Tensor) -> torch.Tensor:
    """(N, T, C) input of a Hugging Face CLIP attention -> (N, num_patches) CLS->patch attention summed over heads."""
    batch, length, _ = hidden.shape
    query = attention.q_proj(hidden[:, :1]).view(batch, 1, attention.num_heads, -1).transpose(1, 2)
    key = attention.k_proj(hidden).view(batch, length, attention.num_heads, -1).transpose(1, 2)
    probs = torch.softmax(query @ key.transpose(-2, -1) * attention.scale, dim=-1)
    return probs[:, :, 0, 1:].sum(dim=1)


def _class_token_attentions(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS->patch attention of the tower's first and penultimate blocks, (num_images, num_patches) each."""
    if is_suite_model(model):
        blocks, tower = _check_tower(model), model.vision_tower
        modules = [blocks[0].attn, blocks[-2].attn]
        run = lambda: tower.model.forward_features(pixel_values.to(next(tower.parameters()).dtype))  # noqa: E731
        attention = lambda module, tokens: class_token_attention(module, tokens, tower.num_prefix_tokens)  # noqa: E731
    else:
        tower, layers = _check_hf_tower(model)
        modules = [layers[0].self_attn, layers[-2].self_attn]
        run = lambda: tower(pixel_values.to(next(tower.parameters()).dtype))  # noqa: E731
        attention = hf_class_token_attention
    seen = {}
    hooks = [module.register_forward_pre_hook(
        lambda module, args, kwargs, index=index: seen.__setitem__(index, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for index, module in enumerate(modules)]
    try:
        with torch.no_grad():
            run()
            return attention(modules[0], seen[0]), attention(modules[1], seen[1])
    finally:
        for hook in hooks:
            hook.remove()


def select_paint_tokens(model, pixel_values: torch.Tensor, local_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_images, num_image_tokens) bool masks (local, summary) in the order the LLM receives the tokens."""
    first, penultimate = _class_token_attentions(model, pixel_values)
    q1 = torch.quantile(penultimate, 0.25, dim=1, keepdim=True)
    q3 = torch.quantile(penultimate, 0.75, dim=1, keepdim=True)
    summary = penultimate > q3 + 1.5 * (q3 - q1)
    count = max(1, round(local_ratio * first.shape[1]))
    top = first.topk(count, dim=1).indices
    local = torch.zeros_like(summary).scatter_(1, top, True) & ~summary
    tower = model.vision_tower if is_suite_model(model) else None
    if tower is not None and tower.keep_prefix_tokens and tower.num_prefix_tokens:
        prefix = torch.zeros(local.shape[0], tower.num_prefix_tokens, dtype=torch.bool, device=local.device)
        local, summary = torch.cat([prefix, local], 1), torch.cat([prefix, summary], 1)
    return local, summary


def head_scale_from_sensitivity(sensitivity: torch.Tensor) -> torch.Tensor:
    """(num_layers, H) visual sensitivity -> per-head margin multipliers with mean 1 in every layer."""
    return sensitivity / sensitivity.mean(dim=1, keepdim=True).clamp_min(1e-12)


def check_head_count(model, sensitivity: torch.Tensor):
    expected = (len(decoder_layers(model)), num_heads(model))
    if tuple(sensitivity.shape) != expected:
        raise ValueError(f"visual_sensitivity statistics have shape {tuple(sensitivity.shape)}, but this model has "
                         f"{expected[0]} layers x {expected[1]} heads: recalibrate (python -m vlm.mitigation)")


def install(plan, options: dict):
    install_boost(plan, options, "paint")
    if options["head_specific"]:
        if "visual_sensitivity" not in plan.stats:
            raise ValueError("paint head_specific=True needs the visual_sensitivity statistics: run "
                             "python -m vlm.mitigation on the model (or set model.mitigation_stats)")
        check_head_count(plan.model, plan.stats["visual_sensitivity"])
        plan.head_scale = head_scale_from_sensitivity(plan.stats["visual_sensitivity"])


register(Method(
    name="paint", description="as PAI, separately for informative and summary visual tokens",
    # separate margins for local (alpha) and summary (beta) image tokens; head_specific scales the margins per
    # head by the calibrated visual sensitivity
    defaults={"alpha": 0.7, "beta": 0.3, "local_ratio": 0.25, "layers": None, "head_specific": False,
              "cfg": None, "cfg_beta": 0.1},
    install=install, layers=llava_depth_layers(2 / 32),
    uses_contrast_branch=lambda options: options["cfg"] is not None,
    check_model=check_paint_tower,
))

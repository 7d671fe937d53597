"""PAI, Paying More Attention to Image (Liu et al., ECCV 2024, arXiv 2407.21771).

In its layers, the last query row's pre-softmax score of every image key gets alpha times its own magnitude
added: a[img] += alpha |a[img]|, so the answer being written looks more at the image. With `cfg=gamma` it also
contrasts with the prompt without its image (gamma (log p_c - log p_u) + log p_u: the contrastive formula with
alpha = gamma - 1; 1.1 in the PAI README, off by default because it costs a second forward per step).
The edit is applied by `attention.AttentionEdits`, which PAINT and VAR share.
"""

import torch

from .contrastive import without_image
from .model_parts import is_suite_model
from .registry import Method, Plan, llava_depth_layers, register


def boost_image_logits(scores: torch.Tensor, key_margins: torch.Tensor, rows: int = 1) -> torch.Tensor:
    """PAI/PAINT: on the last `rows` query rows, score += margin * |score| for every key (margin 0 off the image).

    scores: (B, H, Q, K) pre-softmax logits (before the mask is added); key_margins: (B, H or 1, K). One row in
    a prefill and at each cached step; a forward that re-runs prompt and answer without a cache boosts the
    prompt's last row and every answer row, the rows the cached steps boosted one by one.
    """
    rows = min(rows, scores.shape[2])
    last = scores[:, :, -rows:, :]
    boosted = last + key_margins.unsqueeze(2) * last.abs()
    return boosted if rows == scores.shape[2] else torch.cat([scores[:, :, :-rows, :], boosted], dim=2)


def install_boost(plan: Plan, options: dict, kind: str):
    """PAI's (or PAINT's) margins, and the text-only guidance branch when `cfg` is set."""
    plan.boost = (kind, options)
    if options["cfg"] is not None:
        model = plan.model
        unconditional = without_image(plan.inputs, model.generation_config.pad_token_id or 0,
                                      None if is_suite_model(model) else model.config.image_token_id)
        plan.set_contrast(kind, unconditional, options["cfg"] - 1.0, options["cfg_beta"])


register(Method(
    name="pai", description="raises attention to image tokens in chosen layers",
    defaults={"alpha": 0.2, "layers": None, "cfg": None, "cfg_beta": 0.1},
    install=lambda plan, options: install_boost(plan, options, "pai"),
    layers=llava_depth_layers(2 / 32),  # layers 2..31 of LLaVA-1.5's 32
    uses_contrast_branch=lambda options: options["cfg"] is not None,
))

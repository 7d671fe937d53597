"""VAR, Visual Attention Redistribution (Kang et al., ICLR 2025, arXiv 2503.03321; `seilk/VisAttnSink`).

Visual sink tokens (image tokens whose hidden state has a massive activation in the LLM's sink dimensions) draw
attention that carries little information. In image-centric (head, query) rows VAR keeps the fraction p of
each sink's attention and gives the rest to the other image tokens, in proportion to their attention. The edit
is applied by `attention.AttentionEdits`; the sink dimensions come from the options or the model's calibrated
statistics (`calibration.py`).
"""

import torch

from .model_parts import hidden_size
from .registry import Method, Plan, llava_depth_layers, register


def redistribute_sink_attention(probs, image_keys, sink_keys, query_rows, p: float, summ: float, rho: float):
    """VAR: move attention from sink tokens to the non-sink image tokens in image-centric rows.

    probs: (B, H, Q, K) post-softmax; image_keys, sink_keys: (B, K) bool; query_rows: (B, Q) bool (the
    rows that may be edited). A (head, query) row is image-centric when its image attention is >= summ
    and the visual-sink share of it is <= rho. In such rows each sink's attention is multiplied by p
    (p is the *kept* fraction, as in `seilk/VisAttnSink`) and the removed (1 - p) * sink mass goes to
    the non-sink image tokens in proportion to their attention, so every row keeps its total mass.
    """
    image = image_keys[:, None, None, :].to(probs.dtype)
    sink = sink_keys[:, None, None, :].to(probs.dtype)
    image_mass = (probs * image).sum(-1)
    visual_sink_mass = (probs * image * sink).sum(-1)
    non_sink_image = probs * image * (1 - sink)
    non_sink_mass = non_sink_image.sum(-1)
    sink_mass = (probs * sink).sum(-1)
    selected = (
        (image_mass >= summ) & (visual_sink_mass <= rho * image_mass) & (non_sink_mass > 0) & (sink_mass > 0)
        & query_rows[:, None, :]
    )
    budget = (1 - p) * sink_mass
    edited = probs * (1 - (1 - p) * sink) + (budget / non_sink_mass.clamp_min(1e-12))[..., None] * non_sink_image
    return torch.where(selected[..., None], edited, probs)


def sink_tokens(hidden_states: torch.Tensor, sink_dims, tau: float, eps: float = 1e-6) -> torch.Tensor:
    """VAR's visual-sink test: max over the massive-activation dims of |RMSNorm(x)| (no weight) > tau."""
    normed = hidden_states.float() * torch.rsqrt(hidden_states.float().pow(2).mean(-1, keepdim=True) + eps)
    return normed[..., list(sink_dims)].abs().amax(-1) > tau


def install(plan: Plan, options: dict):
    options = dict(options)
    if options["sink_dims"] is None:
        if "sink_dims" not in plan.stats:
            raise ValueError("var needs the LLM's massive-activation dims: pass {'var': {'sink_dims': [...]}} or "
                             "calibrate them (python -m vlm.mitigation --model DIR --images DIR)")
        options["sink_dims"] = plan.stats["sink_dims"].tolist()
    width = hidden_size(plan.model)
    if any(not 0 <= d < width for d in options["sink_dims"]):
        raise ValueError(f"var sink_dims {options['sink_dims']} out of range for hidden size {width}")
    plan.var = options


register(Method(
    name="var", description="moves attention from visual sink tokens to the other image tokens",
    # keep p of the sink attention of image-centric rows (image mass >= summ, sink share <= rho); tau: sink test
    defaults={"tau": 20.0, "rho": 0.5, "p": 0.6, "summ": 0.2, "sink_dims": None, "layers": None},
    install=install,
    layers=llava_depth_layers(2 / 32, end_offset=1),  # layers 2..30 of 32: the last layer is skipped
))

"""VHR, Vision-aware Head Reinforcement (He et al., ACL 2025, arXiv 2412.13949, Algorithm 1).

At the first generation step each chosen layer measures, per head, the vision-aware head divergence
VHD = ||A(y | image, text) - A(y | text)||_2 of the head's output (before `o_proj`) at the last prompt
token, against an image-free pass. Heads whose VHD *and* image-free activation ||A(y | text)||^2 both
exceed mean + std of their layer are outliers (their VHD is set to 0); the heads above the layer's
median VHD are then scaled by alpha. Layers are handled in order inside one forward pass, so layer l is
measured after the heads of earlier layers were reinforced. The head sets stay fixed for the rest of
the generation (so the KV cache stays consistent).

The image-free pass runs in the same batch as the normal one (2B rows): its image tokens are masked out
as padding, and since positions count only attended tokens that equals removing them from the prompt. On a
Hugging Face VLM the masked placeholders also become padding ids (the family scatters image features into
every placeholder) and each half gets the positions the family's own `generate` gives it (Qwen2-VL's M-RoPE
then sees no image either).
"""

import torch

from ..roles import TokenRole
from .model_parts import attention_module, decoder_layers, is_suite_model, num_heads
from .registry import Method, register


def select_vision_heads(divergence: torch.Tensor, text_activation: torch.Tensor) -> torch.Tensor:
    """(B, H) VHD and image-free activation -> (B, H) bool: the heads VHR reinforces."""
    def outlying(values):
        return values > values.mean(1, keepdim=True) + values.std(1, keepdim=True, correction=0)

    divergence = divergence.masked_fill(outlying(divergence) & outlying(text_activation), 0.0)
    return divergence > divergence.median(dim=1, keepdim=True).values


def scale_heads(head_outputs: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """(N, L, H*d) concatenated head outputs times per-row, per-head factors (n, H); n divides N
    (generate repeats rows for beams and return sequences)."""
    rows, length, width = head_outputs.shape
    if factors.shape[0] != rows:
        factors = factors.repeat_interleave(rows // factors.shape[0], dim=0)
    heads = factors.shape[1]
    scaled = head_outputs.view(rows, length, heads, width // heads) * factors[:, None, :, None].to(head_outputs.dtype)
    return scaled.view(rows, length, width)


def image_free_inputs(inputs: dict, image: torch.Tensor) -> dict:
    """The same prompt with its image tokens masked out as padding (pixel values kept for the placeholders)."""
    free = dict(inputs)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(image, dtype=torch.long) if mask is None else mask
    free["attention_mask"] = mask.masked_fill(image, 0)
    if inputs.get("mm_token_type_ids") is not None:
        free["mm_token_type_ids"] = inputs["mm_token_type_ids"].masked_fill(image, int(TokenRole.PADDING))
    return free


def hf_image_free_pair(model, inputs: dict, image: torch.Tensor) -> dict:
    """A Hugging Face VLM's inputs twice over (2B rows): as given, then with the image tokens masked out as
    padding, each half with its own positions. Per-image tensors (pixel values, grids) serve the first half,
    the only one whose ids still hold image placeholders."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    full = {**inputs, "attention_mask": torch.ones_like(ids) if mask is None else mask}
    pad_id = model.config.get_text_config().pad_token_id or 0
    free = {name: value.masked_fill(image, pad_id if name == "input_ids" else 0)
            for name, value in full.items() if isinstance(value, torch.Tensor) and value.shape == ids.shape}
    halves = [full, {**full, **free}]
    positions = [model._prepare_position_ids_for_generation(half["input_ids"], half) for half in halves]
    paired = {**full, **{name: torch.cat([full[name], free[name]]) for name in free}}
    paired["position_ids"] = torch.cat(positions, dim=positions[0].ndim - 2)  # (B, L), or (3, B, L) for M-RoPE
    return paired


class HeadReinforcement:
    """`select(inputs)` picks the heads (one extra forward); inside `with` their outputs are scaled by alpha."""

    def __init__(self, model, layers: list[int], alpha: float):
        self.model, self.layers, self.alpha = model, list(layers), float(alpha)
        self.selected: dict[int, torch.Tensor] = {}
        self._hooks = []

    def _factors(self, selected: torch.Tensor) -> torch.Tensor:
        return 1.0 + (self.alpha - 1.0) * selected.float()

    def select(self, inputs: dict, image: torch.Tensor) -> dict[int, torch.Tensor]:
        """Run the image / image-free pair through the model once; return layer -> (B, H) selected heads."""
        heads = num_heads(self.model)
        if is_suite_model(self.model):
            free = image_free_inputs(inputs, image)
            batch = {}
            for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
                if free.get(name) is not None:
                    original = inputs[name] if inputs.get(name) is not None else torch.ones_like(free[name])
                    batch[name] = torch.cat([original, free[name]])
            if inputs.get("pixel_values") is not None:
                batch["pixel_values"] = torch.cat([inputs["pixel_values"], inputs["pixel_values"]])
        else:
            batch = hf_image_free_pair(self.model, inputs, image)

        def measure(layer_index):
            def hook(module, args):
                outputs = args[0]
                half = outputs.shape[0] // 2
                last = outputs[:, -1].float().view(outputs.shape[0], heads, -1)
                divergence = (last[:half] - last[half:]).norm(dim=-1)
                selected = select_vision_heads(divergence, last[half:].pow(2).sum(-1))
                self.selected[layer_index] = selected
                return (scale_heads(outputs, self._factors(selected).repeat(2, 1)), *args[1:])
            return hook

        layers = decoder_layers(self.model)
        hooks = [attention_module(layers[i]).o_proj.register_forward_pre_hook(measure(i)) for i in self.layers]
        try:
            with torch.no_grad():
                self.model(**batch, use_cache=False, logits_to_keep=1)
        finally:
            for hook in hooks:
                hook.remove()
        return self.selected

    def __enter__(self):
        if set(self.selected) != set(self.layers):
            raise RuntimeError("HeadReinforcement: call select(inputs, image) before entering")
        layers = decoder_layers(self.model)
        for index in self.layers:
            factors = self._factors(self.selected[index])
            self._hooks.append(attention_module(layers[index]).o_proj.register_forward_pre_hook(
                lambda module, args, factors=factors: (scale_heads(args[0], factors), *args[1:])))
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return False


def default_layers(num_layers: int) -> list[int]:
    """"The second and last 14 layers" of LLaVA-1.5's 32: layer 1 and the last 14/32 of the depth."""
    tail = range(num_layers - max(1, round(14 * num_layers / 32)), num_layers)
    return sorted({min(1, num_layers - 1), *tail})


def install(plan, options: dict):
    plan.vhr = options


register(Method(
    name="vhr", description="reinforces vision-aware attention heads (measured against an image-free pass)",
    # scale the top-half heads (by vision-aware head divergence) of the chosen layers by alpha
    defaults={"alpha": 2.0, "layers": None}, install=install, layers=default_layers,
))

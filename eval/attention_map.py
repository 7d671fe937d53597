"""Where the model looks: attention from one generated token to the image tokens, drawn over the image."""

import math

import torch

from vlm.roles import TokenRole


@torch.no_grad()
def image_attention(model, inputs: dict, sequences: torch.Tensor, query_position: int, row: int = 0) -> torch.Tensor:
    """Attention of the token at `query_position` (in `sequences[row]`) to that row's first image, averaged over
    heads and layers, as a (grid, grid) map; needs a connector that keeps the patch layout (not `perceiver`).

    `inputs` are the processor outputs that produced `sequences` with `generate`."""
    side = math.isqrt(model.num_image_tokens)
    if side * side != model.num_image_tokens or model.config.connector == "perceiver":
        raise ValueError(f"the {model.config.connector} connector's {model.num_image_tokens} tokens have no image grid")
    prompt_length = inputs["input_ids"].shape[1]
    roles = torch.cat([inputs["mm_token_type_ids"], torch.full_like(sequences[:, prompt_length:], TokenRole.ANSWER)], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, prompt_length:])], 1)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # fused attention never materialises the probabilities
    try:
        out = model(input_ids=sequences, pixel_values=inputs["pixel_values"], attention_mask=mask,
                    mm_token_type_ids=roles, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    image_keys = (roles[row] == TokenRole.IMAGE).nonzero().flatten()[: model.num_image_tokens]
    rows = torch.stack([layer[row, :, query_position, image_keys] for layer in out.attentions])  # (layers, heads, N)
    return rows.float().mean(dim=(0, 1)).reshape(side, side)


def plot_attention_on_image(image, attention: torch.Tensor, title: str, path) -> None:
    """Save the image with the attention map laid over it (bilinear upsampling, normalised to [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    heat = attention / attention.max().clamp(min=1e-12)
    heat = torch.nn.functional.interpolate(heat[None, None], size=(image.height, image.width), mode="bilinear")[0, 0]
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2))
    axes[0].imshow(np.asarray(image))
    axes[0].set_title("image")
    axes[1].imshow(np.asarray(image))
    axes[1].imshow(heat.numpy(), cmap="jet", alpha=0.5)
    axes[1].set_title(title)
    for axis in axes:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

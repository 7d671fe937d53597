"""VCD, Visual Contrastive Decoding (Leng et al., CVPR 2024, arXiv 2311.16922; `DAMO-NLP-SG/VCD`).

The contrast input is the image with forward-diffusion noise; the next-token logits follow the contrastive
formula of `contrastive.py`.
"""

import torch

from .registry import Method, register


def diffusion_noise(pixel_values: torch.Tensor, step: int = 500, num_steps: int = 1000, seed: int = 0) -> torch.Tensor:
    """VCD's distorted image: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps on the preprocessed tensor, with
    betas = sigmoid(linspace(-6, 6, num_steps)) * (5e-3 - 1e-5) + 1e-5 (`DAMO-NLP-SG/VCD: vcd_add_noise.py`)."""
    if not 0 <= step < num_steps:
        raise ValueError(f"vcd noise_step={step} must be in [0, {num_steps})")
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, dim=0)[step]
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(pixel_values.shape, generator=generator).to(pixel_values.device, pixel_values.dtype)
    return float(alpha_bar.sqrt()) * pixel_values + float((1 - alpha_bar).sqrt()) * noise


def with_noised_image(inputs: dict, step: int, seed: int) -> dict:
    """VCD's contrast input: each image noised with the noise drawn from `seed` for it alone, so that an image
    is distorted alike in any batch. Qwen2-VL's flattened patches are split per image by `image_grid_thw`;
    Idefics3's all-zero padding images stay zero (its model tells them from real ones that way)."""
    pixels = inputs.get("pixel_values")
    if pixels is None:
        raise ValueError("vcd distorts the image, but the input has no pixel_values")
    grid = inputs.get("image_grid_thw")
    if grid is not None:  # (patches of all images, patch dim)
        images = pixels.split(grid.prod(-1).tolist())
        noised = torch.cat([diffusion_noise(image, step, seed=seed) for image in images])
    else:  # (..., C, H, W)
        images = pixels.reshape(-1, *pixels.shape[-3:])
        noised = torch.stack([diffusion_noise(image, step, seed=seed) if image.any() else image
                              for image in images]).reshape(pixels.shape)
    return {**inputs, "pixel_values": noised}


register(Method(
    name="vcd", description="contrastive decoding against a noised image",
    defaults={"alpha": 1.0, "beta": 0.1, "noise_step": 500, "seed": 0},
    install=lambda plan, options: plan.set_contrast(
        "vcd", with_noised_image(plan.inputs, options["noise_step"], options["seed"]), options["alpha"],
        options["beta"]),
    uses_contrast_branch=lambda options: True,
))

"""Head and hidden-state statistics some methods need, measured once on a set of images and saved with
the model as `mitigation_stats.safetensors` beside its weights (loaded automatically when present).

- `sink_dims` (k,): VAR's "massive activation" dimensions of the LLM: the hidden dims with the largest
  peak |RMSNorm(x)| over all calibration tokens entering layers 2/32 ... L-1 of the depth (for
  LLaMA-2-7B these are {2533, 1415}; they differ for every LLM, so they are measured, not assumed).
- `visual_sensitivity` (L, H): per layer and head, the mean vision-aware head divergence (VHR's VHD,
  without reinforcement) at the last prompt token: how much the head's output changes when the image
  is removed. PAINT's head-specific modulation scales its margins by it (`head_specific=True`).
- `exit_router.*`: DyVTE's routers for `exit:layer=auto` (`token_exit.train_exit_routers`), trained on the
  images asked the prompt and a short question (`ROUTER_QUESTION`).

Command line: `python -m vlm.mitigation --model DIR --images DIR [--num 32]` (`__main__.py`).
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..processing import IMAGE_MARKER
from ..prompts import DETAIL_PROMPT
from .model_parts import attention_module, decoder_layers, image_positions, num_heads
from .token_exit import train_exit_routers
from .vhr import image_free_inputs

STATS_FILE = "mitigation_stats.safetensors"
DEFAULT_PROMPT = f"{IMAGE_MARKER}\n{DETAIL_PROMPT}"
ROUTER_QUESTION = f"{IMAGE_MARKER}\nWhat is in the image?"  # the routers also see a short question's prefill


@torch.no_grad()
def calibrate_mitigation_stats(model, processor, images, prompt: str = DEFAULT_PROMPT, num_sink_dims: int = 2,
                               batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Measure `sink_dims` and `visual_sensitivity` and train the exit routers on `images` (PIL RGB) asked `prompt`
    (one `<image>`)."""
    if prompt.count(processor.image_token) != 1:
        raise ValueError(f"the calibration prompt needs exactly one {processor.image_token} marker: {prompt!r}")
    images = list(images)
    if not images:
        raise ValueError("calibration needs at least one image")
    layers = decoder_layers(model)
    heads = num_heads(model)
    first_sink_layer = round(2 * len(layers) / 32)
    peak = torch.zeros(model.config.text_config.hidden_size)
    divergence_sum = torch.zeros(len(layers), heads)
    measured = {}
    batches = []

    def measure(index):
        def hook(module, args):
            last = args[0][:, -1].float()
            last = last.view(last.shape[0], heads, -1)
            half = last.shape[0] // 2
            measured[index] = (last[:half] - last[half:]).norm(dim=-1).sum(0).cpu()
        return hook

    hooks = [attention_module(layer).o_proj.register_forward_pre_hook(measure(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            inputs = dict(processor(images=chunk, text=[prompt] * len(chunk)))
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            batches += [inputs, {k: v.to(model.device) for k, v in
                                 processor(images=chunk, text=[ROUTER_QUESTION] * len(chunk)).items()}]
            image = image_positions(model, inputs["input_ids"], inputs.get("mm_token_type_ids"))
            free = image_free_inputs(inputs, image)
            pair = {k: torch.cat([inputs[k], free[k]]) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
            pair["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
            output = model(**pair, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            real = inputs["attention_mask"].bool()
            for hidden in output.hidden_states[first_sink_layer + 1:len(layers)]:  # inputs of layers 2/32 .. L-1
                states = hidden[:len(chunk)][real].float()
                normed = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6)
                peak = torch.maximum(peak, normed.abs().amax(0).cpu())
            for index in range(len(layers)):
                divergence_sum[index] += measured[index]
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "sink_dims": peak.topk(num_sink_dims).indices.sort().values,
        "visual_sensitivity": divergence_sum / len(images),
        **train_exit_routers(model, batches).state(),
    }


def save_mitigation_stats(stats: dict, folder) -> Path:
    path = Path(folder) / STATS_FILE
    save_file({k: v.contiguous() for k, v in stats.items()}, str(path))
    return path


def load_mitigation_stats(folder) -> dict | None:
    """The statistics saved in `folder`, or None when it has none."""
    path = Path(folder) / STATS_FILE
    return load_file(str(path)) if path.is_file() else None


def model_mitigation_stats(model) -> dict:
    """`model.mitigation_stats` if set, else the file beside the weights it was loaded from, else {}."""
    stats = getattr(model, "mitigation_stats", None)
    if stats is None:
        folder = getattr(model, "name_or_path", "") or ""
        stats = (load_mitigation_stats(folder) if folder and Path(folder).is_dir() else None) or {}
        model.mitigation_stats = stats
    return stats

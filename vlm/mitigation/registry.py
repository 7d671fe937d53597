"""The mitigation methods' registry: what each method is, and what it adds to a mitigated `generate` call.

Each method has its own file (`vhr.py`, `pai.py`, `paint.py`, `var.py`, `vcd.py`, `icd.py`, `lqcd.py`, and the
efficiency method `token_exit.py`) that
registers one `Method`: its description, its options and their defaults, its default layers for a model's
depth, and `install(plan, options)`, which writes its part into the call's `Plan`. `generation.py` then runs the
plan in a fixed order: the visual-token exit, the attention edits (PAI or PAINT, VAR), VHR's head selection, the
contrast branch.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Plan:
    """What the methods of one `generate` call set up. `inputs` are the call's model inputs (for a Hugging Face
    VLM, every tensor its processor gave); `processor` is the one the caller passed (ICD and LQCD rewrite
    prompts with it); `stats` the model's saved mitigation statistics."""

    model: object
    inputs: dict
    processor: object | None
    stats: dict
    boost: tuple[str, dict] | None = None  # ("pai" or "paint", options): margins on image keys
    head_scale: torch.Tensor | None = None  # PAINT's per-head margin multipliers
    var: dict | None = None
    vhr: dict | None = None
    contrast: tuple[dict, float, float] | None = None  # (contrast inputs, alpha, beta) of the second branch
    contrast_by: str | None = None
    exit_layer: int | str | None = None  # visual-token exit: the first decoder layer without image tokens, or "auto"
    exit_routers: object | None = None  # token_exit.ExitRouters for "auto"

    def set_contrast(self, method: str, inputs: dict, alpha: float, beta: float):
        if self.contrast is not None:  # check_options refuses such combinations first
            raise ValueError(f"{self.contrast_by} and {method} each need the contrast branch")
        self.contrast, self.contrast_by = (inputs, float(alpha), float(beta)), method

    def need_processor(self, method: str, why: str):
        if self.processor is None:
            raise ValueError(f"{method} {why}: pass the processor, model.generate(**inputs, mitigation="
                             f"{method!r}, processor=processor) (vlm eval / ask / caption pass it themselves)")
        return self.processor


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    defaults: dict
    install: Callable[[Plan, dict], None]
    layers: Callable[[int], list[int]] | None = None  # the default layers for an LLM of that many layers
    uses_contrast_branch: Callable[[dict], bool] = field(default=lambda options: False)
    # raises, with the reason, when the method cannot run on a model (PAINT needs a tower with a class token)
    check_model: Callable[[object], None] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def check_supported(model, methods: dict) -> None:
    """Refuse, with the reason, a method of `{method: options}` that cannot run on `model` (never a silent no-op).
    Every method runs on both kinds of model unless its `check_model` says otherwise."""
    for name in methods:
        if METHODS[name].check_model is not None:
            METHODS[name].check_model(model)


def llava_depth_layers(start_fraction: float, end_offset: int = 0) -> Callable[[int], list[int]]:
    """Layers from `start_fraction` of the depth (2/32: LLaVA-1.5's layer 2 of 32) to the end minus `end_offset`."""
    def layers(num_layers: int) -> list[int]:
        start = round(start_fraction * num_layers)
        return list(range(start, max(start + 1, num_layers - end_offset)))
    return layers

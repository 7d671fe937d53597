"""`generate` with mitigation methods switched on for one call, and everything undone afterwards.

Each method writes its part into a `registry.Plan` (its own file says what); the plan then runs in a fixed
order: the visual-token exit's layer hooks; the attention edits (PAI/PAINT/VAR), so that VHR's head selection
pass already sees them; then VHR selects its heads and installs its scaling hooks; a contrastive method adds its
branch as a logits processor. An `ExitStack` removes every hook and restores the attention implementation when generation ends,
also after an exception.
"""

from contextlib import ExitStack

import torch
from transformers import LogitsProcessorList

from .attention import AttentionEdits
from .calibration import model_mitigation_stats
from .contrastive import INPUT_NAMES, ContrastBranch
from .model_parts import decoder_layers, image_positions, is_suite_model
from .registry import METHODS, Plan, check_supported
from .spec import resolve_mitigation
from .token_exit import VisualTokenExit
from .vhr import HeadReinforcement


def generate_with_mitigation(model, mitigation, processor=None, **kwargs):
    """`model.generate(**kwargs)` with `mitigation` on, for a `VisionLanguageModel` or a Hugging Face VLM;
    `processor` is the model's (ICD and LQCD rewrite prompts with it)."""
    if is_suite_model(model):
        return model.generate(mitigation=mitigation, processor=processor, **kwargs)
    return mitigated_generate(model, mitigation, model.generate, processor=processor, **kwargs)


def mitigated_generate(model, mitigation, generate, *args, processor=None, **kwargs):
    """Run `generate(**kwargs)` (the model's plain `generate`) with the `mitigation` spec active."""
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise TypeError("with mitigation, pass the inputs as keywords: model.generate(**inputs, mitigation=...)")
        kwargs["input_ids"] = args[0]
    config = kwargs.get("generation_config") or model.generation_config
    num_beams = kwargs.get("num_beams") or config.num_beams or 1
    methods = resolve_mitigation(mitigation, len(decoder_layers(model)), num_beams)
    check_supported(model, methods)
    if is_suite_model(model):
        inputs = {name: kwargs.get(name) for name in INPUT_NAMES}
    else:  # every tensor the family's processor gave (image_grid_thw, pixel_attention_mask, token_type_ids, ...);
        # Qwen2-VL's own mm_token_type_ids among them are passed on as they are, never read as our roles
        inputs = {name: value for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
    if inputs["input_ids"] is None:
        raise ValueError("mitigation needs input_ids (generation from inputs_embeds is not supported)")
    plan = Plan(model, inputs, processor, model_mitigation_stats(model))
    for name, options in methods.items():
        METHODS[name].install(plan, options)
    with ExitStack() as stack:
        if plan.exit_layer is not None:
            stack.enter_context(VisualTokenExit(model, plan.exit_layer, plan.exit_routers))
        if plan.boost is not None or plan.var is not None:
            kind, boost = plan.boost or ("pai", None)
            stack.enter_context(AttentionEdits(model, boost=boost, boost_kind=kind, var=plan.var,
                                               head_scale=plan.head_scale, pixel_values=inputs.get("pixel_values")))
        if plan.vhr is not None:
            heads = HeadReinforcement(model, plan.vhr["layers"], plan.vhr["alpha"])
            roles = inputs.get("mm_token_type_ids") if is_suite_model(model) else None
            heads.select(inputs, image_positions(model, inputs["input_ids"], roles))
            stack.enter_context(heads)
        if plan.contrast is not None:
            branch = ContrastBranch(model, *plan.contrast)
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), branch])
        return generate(**kwargs)

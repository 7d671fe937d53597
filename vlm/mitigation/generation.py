"""`generate` with mitigation methods switched on for one call, and everything undone afterwards.

Order of set-up: attention edits (PAI/PAINT/VAR) first, so VHR's head selection pass already sees
them; then VHR selects its heads and installs its scaling hooks; a contrastive method adds its branch
as a logits processor. An `ExitStack` removes every hook and restores the attention implementation
when generation ends, also after an exception.
"""

from contextlib import ExitStack

import torch

from transformers import LogitsProcessorList

from .attention import AttentionEdits, check_head_count, head_scale_from_sensitivity
from .calibration import model_mitigation_stats
from .contrastive import (INPUT_NAMES, ContrastBranch, with_leading_suffix, with_noised_image, with_system_prompt,
                          without_image)
from .heads import HeadReinforcement
from .model_parts import check_supported, decoder_layers, hidden_size, image_positions, is_suite_model
from .spec import contrast_branch_users, resolve_mitigation


def generate_with_mitigation(model, mitigation, **kwargs):
    """`model.generate(**kwargs)` with `mitigation` on, for a `VisionLanguageModel` or a Hugging Face VLM."""
    if is_suite_model(model):
        return model.generate(mitigation=mitigation, **kwargs)
    return mitigated_generate(model, mitigation, model.generate, **kwargs)


def mitigated_generate(model, mitigation, generate, *args, **kwargs):
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
    branch_users = contrast_branch_users(methods)
    stats = model_mitigation_stats(model)
    with ExitStack() as stack:
        edits = _attention_edits(model, methods, stats, inputs.get("pixel_values"))
        if edits is not None:
            stack.enter_context(edits)
        if "vhr" in methods:
            heads = HeadReinforcement(model, methods["vhr"]["layers"], methods["vhr"]["alpha"])
            heads.select(inputs, image_positions(model, inputs["input_ids"], inputs.get("mm_token_type_ids")
                                                 if is_suite_model(model) else None))
            stack.enter_context(heads)
        if branch_users:
            branch = _contrast_branch(model, branch_users[0], methods[branch_users[0]], inputs)
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), branch])
        return generate(**kwargs)


def _attention_edits(model, methods, stats, pixel_values) -> AttentionEdits | None:
    kind = "paint" if "paint" in methods else "pai" if "pai" in methods else None
    var = methods.get("var")
    if kind is None and var is None:
        return None
    head_scale = None
    if kind == "paint" and methods["paint"]["head_specific"]:
        if "visual_sensitivity" not in stats:
            raise ValueError("paint head_specific=True needs the visual_sensitivity statistics: run "
                             "vlm.mitigation.calibration on the model (or set model.mitigation_stats)")
        check_head_count(model, stats["visual_sensitivity"])
        head_scale = head_scale_from_sensitivity(stats["visual_sensitivity"])
    if var is not None:
        var = dict(var)
        if var["sink_dims"] is None:
            if "sink_dims" not in stats:
                raise ValueError("var needs the LLM's massive-activation dims: pass {'var': {'sink_dims': [...]}} or "
                                 "calibrate them (python -m vlm.mitigation.calibration --model DIR --images DIR)")
            var["sink_dims"] = stats["sink_dims"].tolist()
        width = hidden_size(model)
        if any(not 0 <= d < width for d in var["sink_dims"]):
            raise ValueError(f"var sink_dims {var['sink_dims']} out of range for hidden size {width}")
    return AttentionEdits(model, boost=methods.get(kind) if kind else None, boost_kind=kind or "pai", var=var,
                          head_scale=head_scale, pixel_values=pixel_values)


def _contrast_branch(model, name, options, inputs) -> ContrastBranch:
    if name == "vcd":
        contrast = with_noised_image(inputs, options["noise_step"], options["seed"])
    elif name == "icd":
        if options["processor"] is None:
            raise ValueError("icd writes its disturbance with the chat template: pass "
                             "mitigation={'icd': {'processor': processor}}")
        contrast = with_system_prompt(inputs, options["processor"], options["disturbance"])
    elif name == "lqcd":
        contrast = _leading_inputs(model, options, inputs)
    else:  # PAI / PAINT text-only guidance: gamma (l_c - l_u) + l_u == (1 + alpha) l_c - alpha l_u, alpha = gamma - 1
        contrast = without_image(inputs, model.generation_config.pad_token_id or 0,
                                 None if is_suite_model(model) else model.config.image_token_id)
        return ContrastBranch(model, contrast, options["cfg"] - 1.0, options["cfg_beta"])
    return ContrastBranch(model, contrast, options["alpha"], options["beta"])


def _leading_inputs(model, options, inputs) -> dict:
    leading = options["leading"]
    if leading is None:
        if options["processor"] is None:
            raise ValueError("lqcd contrasts the given (neutral) query with a leading one: pass mitigation={'lqcd': "
                             "{'leading': processor(images=..., text=leading_prompts)}} or {'processor': processor} "
                             "(adds the leading `suffix` to each prompt)")
        return with_leading_suffix(inputs, options["processor"], options["suffix"])
    if "input_ids" not in leading or leading["input_ids"].shape[0] != inputs["input_ids"].shape[0]:
        raise ValueError(f"lqcd: `leading` must be a processor output with {inputs['input_ids'].shape[0]} prompts")
    if is_suite_model(model):
        return {k: leading.get(k) for k in INPUT_NAMES}
    return {k: v for k, v in leading.items() if isinstance(v, torch.Tensor)}  # the family's processor output

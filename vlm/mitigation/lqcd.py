"""LQCD, Leading-Query Contrastive Decoding: the real input is the neutral query, the contrast a leading one
("... I am sure it is there, right?"), given by the caller or built by adding `suffix` to the last user turn.
"""

import torch

from ..processing import VLMProcessor
from ..roles import TokenRole
from .contrastive import INPUT_NAMES, QUESTION, chat_processor, left_pad, prompt_rows, splice_prompts
from .model_parts import is_suite_model
from .registry import Method, Plan, register


def with_leading_suffix(inputs: dict, processor, suffix: str) -> dict:
    """LQCD's leading query built from the neutral one: `suffix` added at the end of the last user turn."""
    if not isinstance(processor, VLMProcessor):
        chat = chat_processor(processor)
        leading = [{"role": "user", "content": QUESTION[0]["content"] + suffix}]
        return splice_prompts(inputs, chat.prompt_edit(QUESTION, leading), True, chat.tokenizer.pad_token_id or 0,
                              "lqcd")
    tokenizer, template = processor.tokenizer, processor.template
    ending = tokenizer(template.user.split("{content}")[1], add_special_tokens=False)["input_ids"] \
        + tokenizer(template.assistant_header, add_special_tokens=False)["input_ids"]
    added = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    rows = []
    for index, row in enumerate(prompt_rows(inputs)):
        ids, roles = row["input_ids"], row["roles"]
        if ids[-len(ending):] != ending:
            raise ValueError(f"lqcd: prompt {index} does not end with a user turn and the assistant header, "
                             "so the leading suffix has no place; pass `leading` inputs instead")
        cut = len(ids) - len(ending)
        rows.append({"input_ids": ids[:cut] + added + ids[cut:],
                     "roles": roles[:cut] + [int(TokenRole.PROMPT)] * len(added) + roles[cut:]})
    batch = left_pad(rows, tokenizer.pad_token_id)
    if inputs.get("pixel_values") is not None:
        batch["pixel_values"] = inputs["pixel_values"]
    return batch


def leading_inputs(plan: Plan, options: dict) -> dict:
    leading, inputs = options["leading"], plan.inputs
    if leading is None:
        processor = plan.need_processor("lqcd", "adds its leading `suffix` with the chat template (or pass "
                                                "`leading`: processor(images=..., text=leading_prompts))")
        return with_leading_suffix(inputs, processor, options["suffix"])
    if "input_ids" not in leading or leading["input_ids"].shape[0] != inputs["input_ids"].shape[0]:
        raise ValueError(f"lqcd: `leading` must be a processor output with {inputs['input_ids'].shape[0]} prompts")
    if is_suite_model(plan.model):
        return {k: leading.get(k) for k in INPUT_NAMES}
    return {k: v for k, v in leading.items() if isinstance(v, torch.Tensor)}  # the family's processor output


register(Method(
    name="lqcd", description="contrastive decoding against a leading query",
    defaults={"alpha": 1.0, "beta": 0.1, "leading": None, "suffix": " I am sure it is there, right?"},
    install=lambda plan, options: plan.set_contrast("lqcd", leading_inputs(plan, options), options["alpha"],
                                                    options["beta"]),
    uses_contrast_branch=lambda options: True,
))

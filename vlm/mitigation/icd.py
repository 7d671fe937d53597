"""ICD, Instruction Contrastive Decoding (Wang et al., ACL Findings 2024, arXiv 2403.18715).

The contrast input is the same prompt behind a disturbing system instruction ("You are a confused object
detector."), written with the processor's chat template.
"""

from ..processing import VLMProcessor
from ..roles import TokenRole
from .contrastive import QUESTION, chat_processor, left_pad, prompt_rows, splice_prompts
from .registry import Method, register


def with_system_prompt(inputs: dict, processor, text: str) -> dict:
    """ICD's disturbed instruction: a system turn saying `text` put in front of every prompt (on a Hugging Face
    VLM, where the family's chat template puts it)."""
    if not isinstance(processor, VLMProcessor):
        chat = chat_processor(processor)
        edit = chat.prompt_edit(QUESTION, [{"role": "system", "content": text}, *QUESTION])
        return splice_prompts(inputs, edit, False, chat.tokenizer.pad_token_id or 0, "icd")
    prefix = processor.tokenizer(processor.template.system.format(content=text), add_special_tokens=False)["input_ids"]
    rows = [{"input_ids": prefix + row["input_ids"], "roles": [int(TokenRole.SYSTEM)] * len(prefix) + row["roles"]}
            for row in prompt_rows(inputs)]
    batch = left_pad(rows, processor.tokenizer.pad_token_id)
    if inputs.get("pixel_values") is not None:
        batch["pixel_values"] = inputs["pixel_values"]
    return batch


register(Method(
    name="icd", description="contrastive decoding against a disturbed instruction",
    defaults={"alpha": 1.0, "beta": 0.1, "disturbance": "You are a confused object detector."},
    install=lambda plan, options: plan.set_contrast(
        "icd", with_system_prompt(plan.inputs, plan.need_processor("icd", "writes its disturbance with the chat "
                                                                   "template"), options["disturbance"]),
        options["alpha"], options["beta"]),
    uses_contrast_branch=lambda options: True,
))

"""Per-token roles: what each position of a VLM sequence is.

The processor writes one role per token; the mask builder turns roles into attention masks, and the
mitigation heads use them to find image tokens. Roles travel through `generate()` as
`mm_token_type_ids`, which Hugging Face's generation loop slices per step and extends with zeros for
new tokens; that is why ANSWER, the role of generated text, is 0.
"""

from enum import IntEnum


class TokenRole(IntEnum):
    ANSWER = 0  # assistant answers and generated tokens
    SYSTEM = 1  # system-prompt text
    PROMPT = 2  # user text and chat-template headers, the assistant header before an answer included
    IMAGE = 3  # image placeholders, replaced by connector outputs
    PADDING = 4

"""Building the contract's message lists (see `data/__init__.py`): one user turn with its `<image>` marker."""

from vlm.processing import IMAGE_MARKER


def single_turn(prompt: str, answer: str | None = None, num_images: int = 1) -> list[dict]:
    """`[user "<image>\\n{prompt}", assistant answer]`; without `answer`, the user turn alone (evaluation)."""
    messages = [{"role": "user", "content": f"{IMAGE_MARKER}\n" * num_images + prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages

"""Each attention mode's actual mask against a hand-written picture of who sees whom."""

import pytest
import torch

from vlm.masks import ATTENTION_MODES, allowed_pairs, build_attention_mask
from vlm.roles import TokenRole as R
from vlm.testing import tiny_text_config

# Two rows. Row 0: left padding, a system prompt, a user turn with two images, an answer, a second
# user turn and a second answer. Row 1: no padding, one image, then the generation prompt (no answer).
ROW0 = [R.PADDING, R.SYSTEM, R.IMAGE, R.IMAGE, R.PROMPT, R.IMAGE, R.IMAGE, R.PROMPT, R.ANSWER, R.ANSWER, R.PROMPT, R.ANSWER]
ROW1 = [R.SYSTEM, R.PROMPT, R.IMAGE, R.IMAGE, R.IMAGE, R.PROMPT, R.PROMPT, R.PROMPT, R.PROMPT, R.PROMPT, R.PROMPT, R.PROMPT]
ROLES = torch.tensor([ROW0, ROW1])
PADDING_MASK = (ROLES != R.PADDING).long()


def causal_keys(q, first=0):
    return set(range(first, q + 1))


# Hand-written: for each mode, row and query, the extra keys it may see beyond causal.
EXTRA = {
    "causal": ({}, {}),
    # same-image tokens see each other: images at 2-3 and 5-6 (row 0), 2-4 (row 1)
    "bidirectional_visual": ({2: {3}, 5: {6}}, {2: {3, 4}, 3: {4}}),
    # image tokens see the prompt after them up to the first answer (position 8); never 10 (after an answer)
    "modality_mutual": ({2: {4, 7}, 3: {4, 7}, 5: {7}, 6: {7}}, {q: set(range(5, 12)) for q in (2, 3, 4)}),
    # prefix: every non-padding token before the first answer (8) sees all of them; row 1 has no answer
    "prefix": ({q: set(range(1, 8)) for q in range(1, 8)}, {q: set(range(12)) for q in range(12)}),
}
EXTRA["modality_mutual+bidirectional_visual"] = tuple(
    {q: a.get(q, set()) | b.get(q, set()) for q in set(a) | set(b)}
    for a, b in zip(EXTRA["modality_mutual"], EXTRA["bidirectional_visual"])
)


def expected_matrix(mode):
    matrix = torch.zeros(2, 12, 12, dtype=torch.bool)
    for row, first in ((0, 1), (1, 0)):
        for q in range(12):
            for k in causal_keys(q, first) | EXTRA[mode][row].get(q, set()):
                matrix[row, q, k] = True
    matrix[0, :, 0] = False  # nobody attends to padding
    return matrix


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_reference_picture_matches_hand_written(mode):
    assert torch.equal(allowed_pairs(ROLES, PADDING_MASK, mode), expected_matrix(mode))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", [m for m in ATTENTION_MODES if m != "causal"])
def test_mask_given_to_the_decoder_matches_hand_written(mode, backend):
    config = tiny_text_config(attn_implementation=backend)
    embeds = torch.zeros(2, 12, 8)
    mask = build_attention_mask(config, embeds, PADDING_MASK, ROLES, mode)
    visible = mask[:, 0] if backend == "sdpa" else mask[:, 0] == 0
    expected = expected_matrix(mode)
    # The padding query row is fully masked in the reference; backends may leave it as they like.
    assert torch.equal(visible[:, 1:], expected[:, 1:])
    assert torch.equal(visible[1], expected[1])


def test_causal_mode_leaves_the_mask_to_the_decoder():
    config = tiny_text_config()
    assert build_attention_mask(config, torch.zeros(2, 12, 8), PADDING_MASK, ROLES, "causal") is None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="attention_mode"):
        allowed_pairs(ROLES, PADDING_MASK, "bidirectional")


def test_images_side_by_side_are_separate_blocks():
    # <image><image> of two tokens each: a run of four image tokens holding two images
    roles = torch.tensor([[R.PROMPT, R.IMAGE, R.IMAGE, R.IMAGE, R.IMAGE, R.PROMPT]])
    extra = allowed_pairs(roles, torch.ones_like(roles), "bidirectional_visual", tokens_per_image=2)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    expected = causal.clone()
    expected[1, 2] = expected[3, 4] = True  # each image's first token sees its second, nothing of the other image
    assert torch.equal(extra[0], expected)


@pytest.mark.parametrize("mode", ATTENTION_MODES)
def test_two_adjacent_images_in_every_mode(mode):
    """Through the model: with causal and bidirectional-visual masks, changing the second image leaves the first
    image's outputs unchanged (its tokens see nothing after it); modality-mutual lets them see the prompt after
    the images, which saw the second image, and prefix-LM lets the whole prompt see all of it."""
    from PIL import Image

    from vlm.testing import tiny_vlm

    model, processor = tiny_vlm(attention_mode=mode, seed=3)
    first = Image.new("RGB", (32, 32), (200, 30, 30))
    outputs = []
    for second in (Image.new("RGB", (32, 32), (30, 30, 200)), Image.linear_gradient("L").convert("RGB")):
        inputs = processor(images=[[first, second]], text=["<image><image>\nWhich differ?"])
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
    image = (inputs["mm_token_type_ids"] == R.IMAGE)[0].nonzero().flatten()
    first_image = image[:model.num_image_tokens]
    assert len(image) == 2 * model.num_image_tokens and int(image[-1] - image[0]) == len(image) - 1  # adjacent
    changed = (outputs[0][0, first_image] - outputs[1][0, first_image]).abs().max()
    assert (changed < 1e-6) if mode in ("causal", "bidirectional_visual") else (changed > 1e-4), mode

"""`VLMCollator` on real samples: labels cover exactly the answer tokens; long samples are cut or refused."""

import pytest
import torch

from data.collate import VLMCollator
from data.llava import LlavaConversationDataset
from data.scenes import SceneConfig, generate_scenes
from vlm.processing import IGNORE_INDEX, PromptTooLongError, VLMProcessor
from vlm.roles import TokenRole
from vlm.testing import TINY_CORPUS
from vlm.tokenizer import train_tokenizer

NUM_IMAGE_TOKENS = 3


@pytest.fixture(scope="module")
def processor():
    return VLMProcessor(train_tokenizer(TINY_CORPUS, vocab_size=300), image_size=16,
                        num_image_tokens=NUM_IMAGE_TOKENS)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    paths = generate_scenes(folder, 4, seed=2, config=SceneConfig(splits={"train": 1.0}))
    dataset = LlavaConversationDataset(paths["conversations"]["train"], paths["images"]["train"])
    return [dataset[i] for i in range(4)]  # two multi-turn question sets, two detailed descriptions


def test_labels_cover_exactly_the_answers(processor, samples):
    batch = VLMCollator(processor)(samples)
    tokenizer = processor.tokenizer
    end = processor.template.assistant_end
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape
    for row, sample in enumerate(samples):
        answers = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
        # independent reference: each answer (and its end marker) tokenised on its own
        expected = [t for a in answers for t in tokenizer(a + end, add_special_tokens=False)["input_ids"]]
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        supervised = labels != IGNORE_INDEX
        assert labels[supervised].tolist() == expected
        assert torch.equal(labels[supervised], ids[supervised])
        assert torch.equal(supervised, batch["mm_token_type_ids"][row] == TokenRole.ANSWER)
        assert (ids == processor.image_token_id).sum() == NUM_IMAGE_TOKENS
        # every token outside the answers is prompt, image or padding text: decoding the prompt part finds
        # the questions but no answer text of its own turn
        prompt_text = tokenizer.decode(ids[~supervised & (batch["attention_mask"][row] == 1)])
        for message in sample["messages"]:
            if message["role"] == "user":
                assert message["content"].replace("<image>", "").strip() in prompt_text.replace("<image>", "")


def test_too_long_samples_are_truncated_and_counted(processor, samples):
    lengths = [len(processor.encode_conversation(s["messages"], 1)["input_ids"]) for s in samples]
    limit = sorted(lengths)[1] + 1  # two samples fit, two are cut
    collator = VLMCollator(processor, max_length=limit)
    with pytest.warns(UserWarning, match="cut to"):
        batch = collator(samples)
    assert collator.num_truncated == sum(length > limit for length in lengths) == 2
    assert batch["input_ids"].shape[1] == limit
    full = VLMCollator(processor)(samples)
    for row, length in enumerate(lengths):
        kept = min(length, limit)
        # a cut keeps the first `limit` tokens of the full encoding (left padding: real tokens at the end)
        assert torch.equal(batch["input_ids"][row, -kept:], full["input_ids"][row, -length:][:kept])
        assert (batch["labels"][row] != IGNORE_INDEX).any()


def test_split_by_length_keeps_every_sample_with_less_padding(processor, samples):
    collator = VLMCollator(processor)
    full = collator(samples)
    parts = collator.split_by_length(samples, 3)
    assert [len(part["input_ids"]) for part in parts] == [2, 1, 1]

    def rows(batch):  # each sample's real tokens, labels and image (left padding: real tokens at the end)
        for ids, labels, mask, pixels in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                             batch["pixel_values"]):
            real = mask == 1
            yield tuple(ids[real].tolist()), tuple(labels[real].tolist()), round(float(pixels.sum()), 3)

    assert sorted(row for part in parts for row in rows(part)) == sorted(rows(full))
    lengths = [part["attention_mask"].sum(1).tolist() for part in parts]
    assert all(max(shorter) <= min(longer) for shorter, longer in zip(lengths, lengths[1:]))
    padded = sum(part["input_ids"].numel() for part in parts)
    assert padded < full["input_ids"].numel()


def test_too_long_samples_are_refused_on_request(processor, samples):
    collator = VLMCollator(processor, max_length=20, on_too_long="error")
    with pytest.raises(PromptTooLongError, match="sample 000000000001_qa has"):
        collator(samples)
    with pytest.raises(PromptTooLongError, match="image tokens|no answer"):
        VLMCollator(processor, max_length=4)(samples)  # cutting would drop the image: refused, never silent
    with pytest.raises(ValueError, match="on_too_long"):
        VLMCollator(processor, on_too_long="drop")


def test_trained_tokenizer_spends_one_token_per_role_header(processor):
    """Role names are not in the corpus (message contents only), yet every rendered message starts with one."""
    tokenizer = processor.tokenizer
    header = tokenizer("<|im_start|>assistant\n<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(header) == ["<|im_start|>", "assistant", "Ċ", "<|im_start|>", "user", "Ċ"]

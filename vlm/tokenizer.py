"""Offline tokenizers: train a small byte-level BPE on a corpus (no hub access needed)."""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .processing import IMAGE_MARKER

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", IMAGE_MARKER]

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


ROLE_NAMES = "user\nassistant\nsystem"  # what the chat template writes after every <|im_start|>


def _with_role_names(texts: Iterable[str]):
    """The corpus with the role names once per text: every rendered message starts with one, and learnt as
    whole tokens they cost one token per message instead of up to nine."""
    for text in texts:
        yield text
        yield ROLE_NAMES


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, image_token: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (message contents), with ChatML and (unless `image_token`
    is False, as in a text-only LLM's tokenizer) `<image>` special tokens."""
    special_tokens = SPECIAL_TOKENS if image_token else [t for t in SPECIAL_TOKENS if t != IMAGE_MARKER]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_with_role_names(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None,
        unk_token=None, additional_special_tokens=[t for t in special_tokens if t not in ("<|pad|>", "<|im_end|>")],
        chat_template=CHATML_TEMPLATE,
    )

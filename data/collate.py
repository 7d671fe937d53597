"""`VLMCollator`: a list of samples in, one training batch out (labels on answer tokens only).

The processor does the tokenising, role tagging and label masking; the collator adds the length policy:
samples longer than `max_length` tokens are cut from the end (answers go first, image tokens never) or
refused, and every cut is counted. `split_by_length` hands a batch back as length-sorted micro-batches,
so that a training step pads less.
"""

import warnings

import numpy as np

from vlm.processing import PromptTooLongError


class VLMCollator:
    """Collate contract samples (`{"images", "messages", ...}`) into a `BatchFeature` for the model.

    Args:
        processor: a `vlm.VLMProcessor`.
        max_length: token limit per sample (default and upper bound: the processor's `max_length`, the LLM
            context); None with a processor without limit means no limit.
        on_too_long: "truncate" (cut at `max_length` from the end; counted in `num_truncated`, with a
            warning on the first cut) or "error" (raise `PromptTooLongError` naming the sample).
    """

    def __init__(self, processor, max_length: int | None = None, on_too_long: str = "truncate"):
        if on_too_long not in ("truncate", "error"):
            raise ValueError(f"on_too_long must be 'truncate' or 'error', got {on_too_long!r}")
        limits = [limit for limit in (max_length, processor.max_length) if limit is not None]
        self.processor = processor
        self.max_length = min(limits) if limits else None
        self.on_too_long = on_too_long
        self.num_truncated = 0

    def __call__(self, samples: list[dict]):
        return self.processor.collate(self.encode(samples), _images(samples))

    def split_by_length(self, samples: list[dict], parts: int) -> list:
        """The batch as `parts` micro-batches (sizes differ by at most one) of samples of similar token length,
        shortest first: each is padded only to its own longest sample."""
        encoded = self.encode(samples)
        order = sorted(range(len(samples)), key=lambda index: len(encoded[index]["input_ids"]))
        return [self.processor.collate([encoded[i] for i in chosen], _images([samples[i] for i in chosen]))
                for chosen in np.array_split(order, parts)]

    def encode(self, samples: list[dict]) -> list[dict]:
        """Each sample tokenised (with its roles and labels) and cut to `max_length` as the policy says."""
        encoded = []
        for sample in samples:
            try:
                item = self.processor.encode_conversation(sample["messages"], len(sample["images"]))
            except ValueError as error:
                raise ValueError(f"sample {sample.get('id', '?')}: {error}") from None
            if self.max_length is not None and len(item["input_ids"]) > self.max_length:
                if self.on_too_long == "error":
                    raise PromptTooLongError(f"sample {sample.get('id', '?')} has {len(item['input_ids'])} tokens, "
                                             f"more than max_length={self.max_length}")
                try:
                    item, _ = self.processor.truncate(item, self.max_length)
                except PromptTooLongError as error:
                    raise PromptTooLongError(f"sample {sample.get('id', '?')}: {error}") from None
                self.num_truncated += 1
                if self.num_truncated == 1:
                    warnings.warn(f"sample {sample.get('id', '?')} was cut to {self.max_length} tokens; further cuts "
                                  "are counted in VLMCollator.num_truncated", stacklevel=2)
            encoded.append(item)
        return encoded


def _images(samples: list[dict]) -> list:
    return [image for sample in samples for image in sample["images"]]

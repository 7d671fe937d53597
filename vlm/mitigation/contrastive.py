"""Contrastive decoding's second branch, shared by VCD, ICD, LQCD and PAI/PAINT's text-only guidance.

Every method contrasts the next-token logits l of the real input with the logits l' of a degraded one:
    l_cd = (1 + alpha) * l - alpha * l',
keeping only tokens that pass the adaptive plausibility constraint p(y) >= beta * max_w p(w) of the real
input (on logits: l_y >= log(beta) + max l), the rest get -inf. Each method's file builds its degraded input
(`vcd.py`, `icd.py`, `lqcd.py`, `pai.py`); this file holds what they share: the formula, the prompt surgery
(`without_image`, left padding, `splice_prompts` for Hugging Face VLMs) and `ContrastBranch`, a
`LogitsProcessor` with its own KV cache: at the first step it prefills the contrast input once, then it feeds
only the token `generate` just chose, so each step costs one extra single-token forward.
"""

import math

import torch
from transformers import DynamicCache, LogitsProcessor

from ..roles import TokenRole
from .model_parts import is_suite_model

INPUT_NAMES = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values")


def contrastive_logits(logits: torch.Tensor, contrast: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """(1 + alpha) l - alpha l', with -inf outside the plausibility set {y : l_y >= log(beta) + max l}."""
    implausible = logits < logits.max(dim=-1, keepdim=True).values + math.log(beta)
    combined = (1 + alpha) * logits - alpha * contrast
    return combined.masked_fill(implausible, float("-inf"))


def left_pad(rows: list[dict], pad_id: int) -> dict:
    """Rows of equal-length lists/tensors `input_ids`, `roles` -> left-padded batch tensors."""
    longest = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    roles = torch.full((len(rows), longest), int(TokenRole.PADDING), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        if length:
            ids[index, longest - length:] = torch.as_tensor(row["input_ids"])
            roles[index, longest - length:] = torch.as_tensor(row["roles"])
    return {"input_ids": ids, "attention_mask": (roles != TokenRole.PADDING).long(), "mm_token_type_ids": roles}


def prompt_rows(inputs: dict) -> list[dict]:
    """The real (unpadded) tokens of each row, with their roles."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    roles = inputs.get("mm_token_type_ids")
    if roles is None:
        raise ValueError("contrastive decoding needs the token roles (mm_token_type_ids) from the processor")
    keep = roles != TokenRole.PADDING if mask is None else mask.bool() & (roles != TokenRole.PADDING)
    return [{"input_ids": ids[i][keep[i]].tolist(), "roles": roles[i][keep[i]].tolist()} for i in range(len(ids))]


def without_image(inputs: dict, pad_id: int, image_token_id: int | None = None) -> dict:
    """PAI's unconditional input: the same prompt with its image tokens removed (and no pixel values).

    With `image_token_id` (a Hugging Face VLM's inputs, which carry no roles of ours) the tokens of that id go,
    and the result has no roles either."""
    if image_token_id is not None:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        keep = (ids != image_token_id) & (torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool())
        rows = [{"input_ids": ids[i][keep[i]].tolist(), "roles": [int(TokenRole.PROMPT)] * int(keep[i].sum())}
                for i in range(len(ids))]
        batch = left_pad(rows, pad_id)
        del batch["mm_token_type_ids"]
        return batch
    rows = [{"input_ids": [t for t, r in zip(row["input_ids"], row["roles"]) if r != TokenRole.IMAGE],
             "roles": [r for r in row["roles"] if r != TokenRole.IMAGE]} for row in prompt_rows(inputs)]
    return left_pad(rows, pad_id)


def splice_prompts(inputs: dict, edit: tuple, at_end: bool, pad_id: int, method: str) -> dict:
    """A Hugging Face VLM's inputs with a template edit `(head, removed, added, tail)` (`ChatProcessor.prompt_edit`)
    applied to every row: after `head` at the start of the prompt, or before `tail` at its end. The family's
    other per-token tensors (Gemma 3's token_type_ids, Qwen2-VL's mm_token_type_ids) follow, 0 on added tokens;
    per-image tensors are kept; rows are left-padded again."""
    head, removed, added, tail = (list(part) for part in edit)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    per_token = [name for name, value in inputs.items()
                 if isinstance(value, torch.Tensor) and value.shape == ids.shape and name != "attention_mask"]
    rows = []
    for index in range(len(ids)):
        keep = mask[index].bool()
        row = ids[index][keep].tolist()
        cut = len(row) - len(tail) - len(removed) if at_end else len(head)
        if (row[cut:] != removed + tail) if at_end else (row[:cut + len(removed)] != head + removed):
            raise ValueError(f"{method}: prompt {index} is not written the way the family's chat template writes "
                             "prompts, so its edit has no place")
        rows.append({name: (values := inputs[name][index][keep].tolist())[:cut]
                     + (added if name == "input_ids" else [0] * len(added)) + values[cut + len(removed):]
                     for name in per_token})
    longest = max(len(row["input_ids"]) for row in rows)
    batch = {name: torch.tensor([[pad_id if name == "input_ids" else 0] * (longest - len(row[name])) + row[name]
                                 for row in rows], dtype=inputs[name].dtype) for name in per_token}
    batch["attention_mask"] = torch.tensor([[0] * (longest - len(row["input_ids"])) + [1] * len(row["input_ids"])
                                            for row in rows])
    others = {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor) and name not in batch}
    return {**others, **batch}


def chat_processor(processor):
    """The `ChatProcessor` of a Hugging Face processor (or the one given)."""
    from ..hf_models import ChatProcessor

    return processor if isinstance(processor, ChatProcessor) else ChatProcessor(processor)


QUESTION = [{"role": "user", "content": "What is in the image?"}]  # what the template edits are measured on


def repeat_samples(inputs: dict, times: int, num_image_tokens: int) -> dict:
    """Each sample `times` times in a row, as `generate` does for beams and return sequences."""
    repeated = {name: inputs[name].repeat_interleave(times, dim=0)
                for name in ("input_ids", "attention_mask", "mm_token_type_ids") if inputs.get(name) is not None}
    if inputs.get("pixel_values") is not None:
        images_per_sample = (inputs["mm_token_type_ids"] == TokenRole.IMAGE).sum(1) // num_image_tokens
        sample_of_image = torch.repeat_interleave(torch.arange(len(images_per_sample)), images_per_sample)
        order = torch.cat([torch.nonzero(sample_of_image == s).flatten()
                           for s in range(len(images_per_sample)) for _ in range(times)])
        repeated["pixel_values"] = inputs["pixel_values"][order]
    return repeated


class ContrastBranch(LogitsProcessor):
    """Replaces the scores by `contrastive_logits(scores, l', alpha, beta)`, l' from `inputs` with its own cache."""

    def __init__(self, model, inputs: dict, alpha: float, beta: float):
        if not beta > 0:
            raise ValueError(f"plausibility beta must be > 0, got {beta}")
        self.model, self.inputs, self.alpha, self.beta = model, inputs, float(alpha), float(beta)
        self.cache, self.attention_mask, self.length, self.position_ids = None, None, None, None

    @torch.no_grad()
    def contrast_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The contrast branch's next-token logits after the tokens chosen so far (B, V).

        A `VisionLanguageModel` takes its positions from the attention mask and its decode steps as answer
        tokens; a Hugging Face VLM gets its positions as its own `generate` makes them (from the mask at prefill,
        Qwen2-VL's M-RoPE included, then one more per step)."""
        suite = is_suite_model(self.model)
        if self.cache is None:
            inputs = {k: v for k, v in self.inputs.items() if v is not None}
            batch = inputs["input_ids"].shape[0]
            if input_ids.shape[0] != batch:
                if input_ids.shape[0] % batch or not suite:
                    raise ValueError(f"contrast input has {batch} rows, generate has {input_ids.shape[0]} "
                                     "(on Hugging Face VLMs: one sequence per prompt)")
                inputs = repeat_samples(inputs, input_ids.shape[0] // batch, self.model.num_image_tokens)
            inputs = {k: v.to(input_ids.device) for k, v in inputs.items()}
            self.attention_mask = inputs["attention_mask"] = inputs.get("attention_mask",
                                                                         torch.ones_like(inputs["input_ids"]))
            if not suite:
                inputs["position_ids"] = self.model._prepare_position_ids_for_generation(inputs["input_ids"], inputs)
                self.position_ids = inputs["position_ids"]
            self.cache = DynamicCache(config=self.model.config.get_text_config())
            output = self.model(**inputs, cache=self.cache, use_cache=True, logits_to_keep=1)
        else:
            if input_ids.shape[1] != self.length + 1:
                raise RuntimeError("the contrast branch expects exactly one new token per step")
            new = input_ids[:, -1:]
            self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(new)], dim=1)
            if suite:
                step = {"mm_token_type_ids": torch.full_like(new, int(TokenRole.ANSWER))}
            else:
                self.position_ids = self.position_ids[..., -1:] + 1
                step = {"position_ids": self.position_ids}
            output = self.model(input_ids=new, attention_mask=self.attention_mask, cache=self.cache, use_cache=True,
                                logits_to_keep=1, **step)
        self.length = input_ids.shape[1]
        return output.logits[:, -1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        contrast = self.contrast_logits(input_ids).to(scores.dtype)
        return contrastive_logits(scores, contrast, self.alpha, self.beta)

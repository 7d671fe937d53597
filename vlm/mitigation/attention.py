"""Attention edits (PAI, PAINT, VAR) through a registered attention function.

`ATTENTION_NAME` is registered with transformers' `AttentionInterface` together with the SDPA mask
builder in `AttentionMaskInterface`, so the decoder (and `vlm.masks.build_attention_mask` for the
non-causal modes) hands it a boolean mask (True = attend) or None for plain causal. Layers without edits
run SDPA unchanged; the target layers compute attention explicitly so they can edit the scores before
the softmax (PAI, PAINT) or the probabilities after it (VAR).

`AttentionEdits` is the context manager that switches the LLM to this function, marks the target layers,
records per input sequence (one per KV cache) where the image keys, the PAINT token groups and the VAR
sinks are at prefill, and restores the original attention implementation on exit.
"""

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..roles import TokenRole
from .model_parts import (attention_module, cached_length, decoder_layers, forward_arguments, image_positions,
                          pad_keys, text_decoder)
from .paint import select_paint_tokens
from .pai import boost_image_logits
from .var import redistribute_sink_attention, sink_tokens

ATTENTION_NAME = "vlm_mitigation"
EDITS_ATTRIBUTE = "_mitigation_edits"


# ------------------------------------------------------------------ per-sequence records
@dataclass
class SequenceRecord:
    """What an input sequence's prefill showed, per key position (B, L0); decode steps pad with False."""

    image_keys: torch.Tensor
    query_rows: torch.Tensor  # rows VAR may edit at prefill: text after the last image token
    local_keys: torch.Tensor | None = None  # PAINT
    summary_keys: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    sinks: dict = field(default_factory=dict)  # VAR: layer -> (B, L0) bool
    is_prefill: bool = True
    # positions of the prompt: all of a prefill; in a forward re-running prompt and answer without a cache
    # (`use_cache=False`), the length of the first such forward, the answer rows coming after it
    prompt_length: int | None = None
    _memo: dict = field(default_factory=dict)
    _memo_length: int = -1

    def memo(self, key, length: int, compute):
        """A value of the current step shared by the layers (e.g. a key mask padded to `length` keys),
        computed once per step; a new key length (the next step) starts afresh."""
        if length != self._memo_length:
            self._memo, self._memo_length = {}, length
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


def _rows_after_images(image: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    positions = torch.arange(image.shape[1], device=image.device).expand_as(image)
    last_image = torch.where(image, positions, torch.full_like(positions, -1)).amax(1, keepdim=True)
    rows = positions > last_image
    return rows if padding is None else rows & ~padding


# ------------------------------------------------------------------ the registered attention function
def mitigation_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA for untouched layers; explicit attention with the layer's edits where `AttentionEdits` put some."""
    edits = getattr(module, EDITS_ATTRIBUTE, None)
    if edits is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return edits.attend(module, query, key, value, attention_mask, scaling)


AttentionInterface.register(ATTENTION_NAME, mitigation_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _mask_scores(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply what the SDPA mask builder gave: a bool mask, an additive float one, or None for causal."""
    minimum = torch.finfo(scores.dtype).min
    if attention_mask is None:
        queries, keys = scores.shape[-2:]
        if queries == 1:
            return scores
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=scores.device).tril(keys - queries)
        return scores.masked_fill(~allowed, minimum)
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, scores, torch.tensor(minimum, dtype=scores.dtype, device=scores.device))
    return scores + attention_mask


class LayerEdits:
    """The edits of one decoder layer; `attend` is eager attention with them applied."""

    def __init__(self, owner: "AttentionEdits", layer_index: int, boost: dict | None, var: dict | None,
                 head_scale: torch.Tensor | None = None):
        self.owner, self.layer_index, self.boost, self.var, self.head_scale = owner, layer_index, boost, var, head_scale

    def key_margins(self, record: SequenceRecord, length: int, dtype) -> torch.Tensor:
        """(B, H or 1, K) PAI/PAINT margins per key."""
        def compute():
            if record.local_keys is None:  # PAI: one margin for every image token
                return (self.boost["alpha"] * pad_keys(record.image_keys, length).to(dtype))[:, None, :]
            return (self.boost["alpha"] * pad_keys(record.local_keys, length).to(dtype)
                    + self.boost["beta"] * pad_keys(record.summary_keys, length).to(dtype))[:, None, :]

        margins = record.memo(("margins", dtype), length, compute)
        if self.head_scale is not None:
            margins = margins * self.head_scale[None, :, None].to(margins.device, dtype)
        return margins

    def attend(self, module, query, key, value, attention_mask, scaling):
        record = self.owner.current
        batch, heads, queries, _ = query.shape
        key_heads, length = key.shape[1], key.shape[2]
        # Grouped-query attention without copying keys and values per query head: the query heads that share a
        # key head (consecutive, as `repeat_kv` orders them) become rows of one matmul, which spares two copies
        # per edited layer and decode step (measured: PAI 1.09-1.11x plain per token instead of 1.10-1.19x).
        grouped_query = query.reshape(batch, key_heads, heads // key_heads * queries, -1)
        scores = torch.matmul(grouped_query, key.transpose(2, 3)).mul_(scaling).view(batch, heads, queries, length)
        if self.boost is not None:
            rows = 1 + queries - record.prompt_length if record.is_prefill and record.prompt_length else 1
            scores = boost_image_logits(scores, self.key_margins(record, length, scores.dtype), rows)
        scores = _mask_scores(scores, attention_mask)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if self.var is not None:
            prefill_sinks = record.sinks.get(self.layer_index)
            if prefill_sinks is not None:
                rows = record.query_rows[:, -query.shape[2]:] if record.is_prefill else \
                    torch.ones(query.shape[0], query.shape[2], dtype=torch.bool, device=query.device)
                image = record.memo("image", length, lambda: pad_keys(record.image_keys, length))
                sinks = record.memo(("sinks", self.layer_index), length, lambda: pad_keys(prefill_sinks, length))
                probs = redistribute_sink_attention(probs, image, sinks, rows, self.var["p"], self.var["summ"],
                                                    self.var["rho"])
        output = torch.matmul(probs.reshape(batch, key_heads, -1, length), value)
        return output.view(batch, heads, queries, -1).transpose(1, 2).contiguous(), probs


class AttentionEdits:
    """Context manager: PAI/PAINT (`boost`, one of them) and/or VAR (`var`) on their layers of `model`.

    `var["sink_dims"]` must hold the LLM's massive-activation dimensions; `head_scale` (num_layers, H)
    optionally scales PAINT's margins per head (head-specific modulation).
    """

    def __init__(self, model, boost: dict | None = None, boost_kind: str = "pai", var: dict | None = None,
                 head_scale: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None):
        self.model, self.boost, self.boost_kind, self.var, self.head_scale = model, boost, boost_kind, var, head_scale
        # the generate call's images, for PAINT: transformers' generate may hand the prefill forward the image
        # features it computed instead of the pixels
        self.pixel_values = pixel_values
        self.uncached_prompt_length: int | None = None
        self.records: dict[int, SequenceRecord] = {}
        self.current: SequenceRecord | None = None
        self._hooks, self._edited, self._original = [], [], None

    def __enter__(self):
        decoder = text_decoder(self.model)
        self._original = decoder.config._attn_implementation
        try:
            layers = decoder_layers(self.model)
            boost_layers = set(self.boost["layers"]) if self.boost else set()
            var_layers = set(self.var["layers"]) if self.var else set()
            for index in sorted(boost_layers | var_layers):
                attention = attention_module(layers[index])
                scale = self.head_scale[index] if self.head_scale is not None and index in boost_layers else None
                setattr(attention, EDITS_ATTRIBUTE, LayerEdits(
                    self, index, self.boost if index in boost_layers else None,
                    self.var if index in var_layers else None, scale))
                self._edited.append(attention)
                if index in var_layers:
                    self._hooks.append(layers[index].register_forward_pre_hook(
                        self._sink_detector(index), with_kwargs=True))
            self._hooks.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
            decoder.set_attn_implementation(ATTENTION_NAME)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        for attention in self._edited:
            if hasattr(attention, EDITS_ATTRIBUTE):
                delattr(attention, EDITS_ATTRIBUTE)
        self._hooks, self._edited, self.records, self.current = [], [], {}, None
        decoder = text_decoder(self.model)
        if self._original is not None and decoder.config._attn_implementation != self._original:
            decoder.set_attn_implementation(self._original)
        return False

    def _on_model_forward(self, module, args, kwargs):
        """Find (at prefill) or recall (at decode steps) the record of the sequence this forward belongs to."""
        inputs = forward_arguments(self.model, args, kwargs)
        cache = inputs["cache"]
        if cached_length(cache) == 0:
            record = self._prefill_record(inputs)
            length = inputs["input_ids"].shape[1]
            if cache is None:  # the first forward without a cache is the prompt; later ones re-run it with answers
                self.uncached_prompt_length = self.uncached_prompt_length or length
                record.prompt_length = min(self.uncached_prompt_length, length)
            else:
                record.prompt_length = length
            if cache is not None:
                self.records[id(cache)] = record
        else:
            record = self.records.get(id(cache))
            if record is None:
                raise RuntimeError("a decode step came with a KV cache filled outside this mitigated generate call")
            record.is_prefill = False
        self.current = record

    def _prefill_record(self, inputs) -> SequenceRecord:
        roles, mask = inputs["mm_token_type_ids"], inputs["attention_mask"]
        image = image_positions(self.model, inputs["input_ids"], roles)
        padding = roles == TokenRole.PADDING if roles is not None else None if mask is None else mask == 0
        record = SequenceRecord(image_keys=image, query_rows=_rows_after_images(image, padding), padding=padding)
        if self.boost_kind == "paint":
            pixels = inputs["pixel_values"] if inputs["pixel_values"] is not None else self.pixel_values
            placeholders = inputs["input_ids"] == self.model.config.image_token_id
            record.local_keys = record.summary_keys = torch.zeros_like(image)
            if pixels is not None and placeholders.any():  # a prefill without images (a contrast input) has none
                local, summary = select_paint_tokens(self.model, pixels, self.boost["local_ratio"])
                record.local_keys = torch.zeros_like(placeholders).masked_scatter(placeholders, local.flatten()) & image
                record.summary_keys = torch.zeros_like(placeholders).masked_scatter(placeholders,
                                                                                    summary.flatten()) & image
        return record

    def _sink_detector(self, layer_index):
        def detect(module, args, kwargs):
            record = self.current
            if record is None or not record.is_prefill:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            sinks = sink_tokens(hidden, self.var["sink_dims"], self.var["tau"])
            if record.padding is not None:
                sinks &= ~record.padding
            sinks[:, record.prompt_length:] = False  # answer tokens are never sinks, re-run or cached
            record.sinks[layer_index] = sinks
        return detect

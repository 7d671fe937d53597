"""Visual-token exit: the image tokens leave the decoder at a chosen layer (after DyVTE, Wu et al., "Accelerating
Multimodal Large Language Models via Dynamic Visual-Token Exit"; `DoubtedSteam/DyVTE`).

From layer `layer` on, the image tokens' hidden states are dropped: those layers neither compute them nor keep
their keys and values in the KV cache, so prefill and every decode step do less work. The text tokens keep their
positions. What the text computes is then exactly what it would compute if, from that layer on, no query could
attend to an image key (the tests check this against that masked model).

It is an efficiency method, not a hallucination mitigation, but it is switched on per `generate` call in the same
way (`mitigation="exit:layer=8"`) so that it composes with them: the contrastive methods (VCD, ICD, LQCD) run
their branch with the same exit; methods that read or edit image attention (VHR, PAI, PAINT, VAR) are refused on
layers at or above the exit (`spec.resolve_mitigation`).

Rows of a batch may hold different numbers of image tokens (multi-image prompts, padding): the kept tokens of
each row are packed to the right, as left padding, and the packing slots stay masked.
"""

import weakref
from dataclasses import dataclass, field

import torch

from .model_parts import cached_length, decoder_layers, forward_arguments, image_positions, text_decoder
from .registry import Method, Plan, register


@dataclass
class KeptTokens:
    """Which prefill positions the layers at and above the exit keep, per row: `index` (B, R) into the prefill's
    L0 positions, packed to the right; `valid` (B, R) False on packing slots."""

    index: torch.Tensor
    valid: torch.Tensor
    prefill_length: int
    _masks: dict = field(default_factory=dict)  # id(original) -> (original, its kept form), for one forward

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """`tensor` (..., B or 1, L0, ...), its batch dim right before `dim` (counted from the end), at the kept
        positions: hidden states and rotary tables (B, L0, D) with dim=-2, position ids (B or 3 x B, L0) with -1."""
        batch_dim = tensor.ndim + dim - 1
        shape = list(tensor.shape)
        shape[batch_dim] = self.index.shape[0]
        tensor = tensor.expand(shape)
        index = self.index.reshape([1] * batch_dim + list(self.index.shape) + [1] * (-dim - 1))
        shape[tensor.ndim + dim] = self.index.shape[1]
        return tensor.gather(tensor.ndim + dim, index.expand(shape))


def pack_kept(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool -> `(index, valid)` (B, R): each row's kept positions in order, packed to the right (R = the
    most any row keeps); packing slots point at position 0 and are not valid."""
    counts = keep.sum(1)
    width = int(counts.max()) if keep.numel() else 0
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    # sort kept positions to the end, in order: dropped ones get -1 and come first
    ordered = torch.where(keep, positions, torch.full_like(positions, -1)).sort(1).values[:, keep.shape[1] - width:]
    valid = ordered >= 0
    return ordered.clamp(min=0), valid


def _blocked(mask: torch.Tensor):
    return torch.tensor(False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min, dtype=mask.dtype,
                        device=mask.device)


def _allowed(mask: torch.Tensor):
    return torch.tensor(True if mask.dtype == torch.bool else 0.0, dtype=mask.dtype, device=mask.device)


def prefill_mask(mask: torch.Tensor | None, kept: KeptTokens) -> torch.Tensor:
    """The prefill's (B, 1 or H, L0, L0) mask (bool, or additive float for eager attention; None: causal) on the
    kept rows and columns. Packing slots are keys for nobody and attend to themselves only (a query row without
    any key would give NaN, and NaN values poison the other rows even at zero weight)."""
    index, valid = kept.index, kept.valid
    if mask is None:
        mask = index[:, None, None, :] <= index[:, None, :, None]
    else:
        batch, heads, _, keys = mask.shape
        rows = index.shape[1]
        mask = mask.expand(index.shape[0], heads, -1, -1)
        mask = mask.gather(2, index[:, None, :, None].expand(-1, heads, rows, keys))
        mask = mask.gather(3, index[:, None, None, :].expand(-1, heads, rows, rows))
    mask = torch.where(valid[:, None, None, :], mask, _blocked(mask))
    slots = torch.diag_embed(~valid)[:, None]
    return torch.where(slots, _allowed(mask), mask)


def decode_mask(mask: torch.Tensor | None, kept: KeptTokens, queries: int, generated: int) -> torch.Tensor:
    """A decode step's mask over the kept prefill keys and every generated key; `generated`: generated keys
    cached before this step. The full mask (B, 1 or H, Q, L0 + generated + Q) is cut to those columns."""
    batch = kept.index.shape[0]
    new = torch.arange(kept.prefill_length, kept.prefill_length + generated + queries, device=kept.index.device)
    columns = torch.cat([kept.index, new.expand(batch, -1)], dim=1)
    valid = torch.cat([kept.valid, torch.ones(batch, new.shape[0], dtype=torch.bool, device=new.device)], dim=1)
    if mask is None:  # causal: the step's queries see every earlier key and themselves
        query_positions = kept.prefill_length + generated + torch.arange(queries, device=new.device)
        mask = columns[:, None, None, :] <= query_positions[None, None, :, None]
    else:
        mask = mask.expand(batch, *mask.shape[1:])
        mask = mask.gather(-1, columns[:, None, None, :].expand(*mask.shape[:-1], -1))
    return torch.where(valid[:, None, None, :], mask, _blocked(mask))


class VisualTokenExit:
    """Context manager: from decoder layer `layer` on, `model` computes and caches no image tokens.

    A forward that brings image tokens (a prefill, or a forward without cache re-running the prompt) decides the
    kept tokens; a decode step on a cache it filled reuses them. The state is kept per KV cache, so a contrast
    branch with its own cache gets its own."""

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer
        decoder = text_decoder(model)
        backend = decoder.config._attn_implementation or ""
        if backend.startswith(("flash", "flex")):
            raise ValueError(f"visual-token exit hands the decoder its own masks, which {backend} does not take: "
                             "use attn_implementation='sdpa' or 'eager'")
        layer_types = getattr(decoder.config, "layer_types", None) or []
        self.window = getattr(decoder.config, "sliding_window", None)
        self.sliding = {i for i, kind in enumerate(layer_types) if kind == "sliding_attention" and i >= layer}
        self.by_cache = weakref.WeakKeyDictionary()
        self.current: KeptTokens | None = None
        self.current_is_prefill = False
        self._hooks = []

    def __enter__(self):
        try:
            self._hooks.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
            for index, layer in enumerate(decoder_layers(self.model)):
                if index >= self.layer:
                    self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.current = [], None
        return False

    def _on_model_forward(self, module, args, kwargs):
        inputs = forward_arguments(self.model, args, kwargs)
        cache, ids = inputs["cache"], inputs["input_ids"]
        if ids is None:
            raise ValueError("visual-token exit finds the image tokens in input_ids: generate from input_ids, "
                             "not inputs_embeds")
        image = image_positions(self.model, ids, inputs["mm_token_type_ids"])
        past = cached_length(cache)
        if image.any():
            if past:
                raise ValueError("visual-token exit: image tokens after a filled KV cache (prefill every image)")
            index, valid = pack_kept(~image)
            self.current, self.current_is_prefill = KeptTokens(index, valid, image.shape[1]), True
            if cache is not None:
                self.by_cache[cache] = self.current
        else:
            self.current, self.current_is_prefill = self.by_cache.get(cache) if cache is not None else None, False
        if self.sliding and self.current is not None:
            length = past + ids.shape[1]
            if length > self.window:
                raise ValueError(f"visual-token exit on sliding-window layers {sorted(self.sliding)} needs the "
                                 f"sequence within the window of {self.window} tokens; it reached {length} tokens")
        if self.current is not None:
            self.current._masks.clear()

    def _layer_hook(self, index: int):
        def exit_tokens(module, args, kwargs):
            kept = self.current
            if kept is None:
                return None
            hidden = args[0] if args else kwargs.pop("hidden_states")
            mask = kwargs.get("attention_mask")
            if self.current_is_prefill:
                if index == self.layer:
                    hidden = kept.gather(hidden, dim=-2)
                rotary = kwargs.get("position_embeddings")
                if rotary is not None:
                    kwargs["position_embeddings"] = self._memo(kept, rotary, lambda: tuple(
                        kept.gather(part, dim=-2) for part in rotary))
                if isinstance(kwargs.get("position_ids"), torch.Tensor):
                    kwargs["position_ids"] = kept.gather(kwargs["position_ids"], dim=-1)
                kwargs["attention_mask"] = self._memo(kept, mask, lambda: prefill_mask(mask, kept))
            else:
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                generated = cache.layers[index].get_seq_length() - kept.index.shape[1]
                kwargs["attention_mask"] = self._memo(kept, mask, lambda: decode_mask(
                    mask, kept, hidden.shape[1], generated))
            return (hidden, *args[1:]), kwargs
        return exit_tokens

    @staticmethod
    def _memo(kept: KeptTokens, mask, compute):
        """One kept form of each original (a mask, the rotary tables) per forward: the decoder hands every layer
    the same objects (one per layer type)."""
        key = id(mask)
        if key not in kept._masks or kept._masks[key][0] is not mask:
            kept._masks[key] = (mask, compute())
        return kept._masks[key][1]


def install(plan: Plan, options: dict):
    plan.exit_layer = options["layer"]


register(Method(
    name="exit", description="visual-token exit: image tokens leave the decoder at a layer (faster, DyVTE)",
    # layer: the first decoder layer without image tokens; None: half the depth
    defaults={"layer": None},
    install=install,
))

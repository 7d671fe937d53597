"""Visual-token exit: the image tokens leave the decoder at a chosen layer (after DyVTE, Wu et al., "Accelerating
Multimodal Large Language Models via Dynamic Visual-Token Exit"; `DoubtedSteam/DyVTE`).

From layer `layer` on, the image tokens' hidden states are dropped: those layers neither compute them nor keep
their keys and values in the KV cache, so prefill and every decode step do less work. The text tokens keep their
positions. What the text computes is then exactly what it would compute if, from that layer on, no query could
attend to an image key (the tests check this against that masked model).

`exit:layer=auto` lets DyVTE's routers decide the layer for each row of a prefill (`ExitRouters`, trained by
`train_exit_routers` when the model's mitigation statistics are calibrated).

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
from torch import nn

from ..roles import TokenRole
from .model_parts import (cached_length, decoder_layers, forward_arguments, image_positions, is_suite_model,
                          text_decoder)
from .registry import Method, Plan, register


@dataclass
class KeptTokens:
    """Which prefill positions a layer keeps, per row: `index` (B, R) into the prefill's L0 positions, packed to
    the right; `valid` (B, R) False on packing slots."""

    index: torch.Tensor
    valid: torch.Tensor

    def __post_init__(self):
        self.all_valid = bool(self.valid.all())  # no packing slots: every row keeps as many tokens

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

    def within(self, wider: "KeptTokens", length: int) -> torch.Tensor:
        """(B, R) positions of these kept tokens inside the `wider` kept set they were cut from (0 for slots)."""
        rows, width = wider.index.shape
        place = torch.zeros(rows, length + 1, dtype=torch.long, device=wider.index.device)
        # packing slots all point at position 0: send them to a spare column so they overwrite nothing
        place.scatter_(1, torch.where(wider.valid, wider.index, length),
                       torch.arange(width, device=place.device).expand(rows, -1))
        return place.gather(1, self.index)


@dataclass
class ExitState:
    """One prefill's exits: the image and text tokens, the rows whose image tokens have left, and the kept set of
    every layer from the first exit on (the decode steps' masks follow each layer's own)."""

    image: torch.Tensor  # (B, L0)
    text: torch.Tensor  # (B, L0) neither image nor padding: the routers' input
    exited: torch.Tensor  # (B,) bool
    by_layer: dict = field(default_factory=dict)  # layer -> KeptTokens
    latest: KeptTokens | None = None  # the kept set the prefill's hidden states are in now
    _memo: dict = field(default_factory=dict)  # (id(original), id(kept set)) -> (original, its kept form)

    @property
    def prefill_length(self) -> int:
        return self.image.shape[1]


def pack_kept(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool -> `(index, valid)` (B, R): each row's kept positions in order, packed to the right (R = the
    most any row keeps); packing slots point at position 0 and are not valid."""
    width = int(keep.sum(1).max())
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    # sort kept positions to the end, in order: dropped ones get -1 and come first
    ordered = torch.where(keep, positions, torch.full_like(positions, -1)).sort(1).values[:, keep.shape[1] - width:]
    valid = ordered >= 0
    return ordered.clamp(min=0), valid


def text_tokens(image: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L) the tokens that are neither image nor padding: what the routers average."""
    return ~image if attention_mask is None else ~image & attention_mask.bool()


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
        if kept.all_valid:  # the kept tokens alone, in order: causal is still right, and SDPA's fast path with it
            return None
        mask = index[:, None, None, :] <= index[:, None, :, None]
    else:
        _, heads, _, keys = mask.shape
        rows = index.shape[1]
        mask = mask.expand(index.shape[0], heads, -1, -1)
        mask = mask.gather(2, index[:, None, :, None].expand(-1, heads, rows, keys))
        mask = mask.gather(3, index[:, None, None, :].expand(-1, heads, rows, rows))
    mask = torch.where(valid[:, None, None, :], mask, _blocked(mask))
    slots = torch.diag_embed(~valid)[:, None]
    return torch.where(slots, _allowed(mask), mask)


def decode_mask(mask: torch.Tensor | None, kept: KeptTokens, prefill_length: int, queries: int,
                generated: int) -> torch.Tensor:
    """A decode step's mask over the kept prefill keys and every generated key; `generated`: generated keys
    cached before this step. The full mask (B, 1 or H, Q, L0 + generated + Q) is cut to those columns."""
    if mask is None and kept.all_valid and queries == 1:  # one query sees every kept key: no mask needed
        return None
    batch = kept.index.shape[0]
    new = torch.arange(prefill_length, prefill_length + generated + queries, device=kept.index.device)
    columns = torch.cat([kept.index, new.expand(batch, -1)], dim=1)
    valid = torch.cat([kept.valid, torch.ones(batch, new.shape[0], dtype=torch.bool, device=new.device)], dim=1)
    if mask is None:  # causal: the step's queries see every earlier key and themselves
        query_positions = prefill_length + generated + torch.arange(queries, device=new.device)
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

    def __init__(self, model, layer: int | str, routers: "ExitRouters | None" = None):
        """`layer`: the first layer without image tokens, or "auto": each prefill exits at the first layer whose
        router (`routers`) says the text has taken what it needs from the image."""
        if layer == "auto" and routers is None:
            raise ValueError("exit:layer=auto needs the exit routers trained for this model: "
                             "python -m vlm.mitigation --model DIR --images DIR trains and saves them")
        self.model, self.layer, self.routers = model, layer, routers
        self.first_layer = routers.first_layer if layer == "auto" else layer
        decoder = text_decoder(model)
        backend = decoder.config._attn_implementation or ""
        if backend.startswith(("flash", "flex")):
            raise ValueError(f"visual-token exit hands the decoder its own masks, which {backend} does not take: "
                             "use attn_implementation='sdpa' or 'eager'")
        layer_types = getattr(decoder.config, "layer_types", None) or []
        self.window = getattr(decoder.config, "sliding_window", None)
        self.sliding = {i for i, kind in enumerate(layer_types)
                        if kind == "sliding_attention" and i >= self.first_layer}
        self.by_cache = weakref.WeakKeyDictionary()
        self.current: ExitState | None = None
        self.current_is_prefill = False
        self._hooks = []

    def __enter__(self):
        try:
            self._hooks.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
            for index, layer in enumerate(decoder_layers(self.model)):
                if index >= self.first_layer:
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
            exited = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
            text = text_tokens(image, inputs["attention_mask"])
            self.current, self.current_is_prefill = ExitState(image, text, exited), True
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
            self.current._memo.clear()

    def _exiting(self, index: int, hidden: torch.Tensor, state: ExitState) -> torch.Tensor:
        """(B,) the rows whose image tokens leave at layer `index` (a prefill): all at the fixed layer, or those
        whose router says so."""
        if self.layer != "auto":
            return ~state.exited if index == self.layer else torch.zeros_like(state.exited)
        text = state.text if state.latest is None else state.latest.gather(state.text, dim=-1) & state.latest.valid
        return self.routers.exits(index, hidden, text) & ~state.exited

    def _exit_rows(self, hidden: torch.Tensor, rows: torch.Tensor, state: ExitState) -> torch.Tensor:
        """Drop the image tokens of `rows` from here on; returns the hidden states of the new kept set."""
        state.exited = state.exited | rows
        kept = KeptTokens(*pack_kept(~(state.image & state.exited[:, None])))
        if state.latest is None:
            hidden = kept.gather(hidden, dim=-2)
        else:  # the hidden states are in the previous kept set
            place = kept.within(state.latest, state.prefill_length)
            hidden = hidden.gather(1, place[..., None].expand(-1, -1, hidden.shape[-1]))
        state.latest = kept
        return hidden

    def _layer_hook(self, index: int):
        def exit_tokens(module, args, kwargs):
            state = self.current
            if state is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.current_is_prefill:
                rows = self._exiting(index, hidden, state)
                if rows.any():
                    hidden = self._exit_rows(hidden, rows, state)
                if state.latest is None:
                    return None
                state.by_layer[index] = kept = state.latest
            else:
                kept = state.by_layer.get(index)
                if kept is None:
                    return None
            kwargs.pop("hidden_states", None)
            mask = kwargs.get("attention_mask")
            if self.current_is_prefill:
                rotary = kwargs.get("position_embeddings")
                if rotary is not None:
                    kwargs["position_embeddings"] = self._memo(state, kept, rotary, lambda: tuple(
                        kept.gather(part, dim=-2) for part in rotary))
                if isinstance(kwargs.get("position_ids"), torch.Tensor):
                    kwargs["position_ids"] = kept.gather(kwargs["position_ids"], dim=-1)
                kwargs["attention_mask"] = self._memo(state, kept, mask, lambda: prefill_mask(mask, kept))
            else:
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                generated = cache.layers[index].get_seq_length() - kept.index.shape[1]
                kwargs["attention_mask"] = self._memo(state, kept, mask, lambda: decode_mask(
                    mask, kept, state.prefill_length, hidden.shape[1], generated))
            return (hidden, *args[1:]), kwargs
        return exit_tokens

    @staticmethod
    def _memo(state: ExitState, kept: KeptTokens, original, compute):
        """One kept form of each original (a mask, the rotary tables) and kept set per forward: the decoder hands
        every layer the same objects (one per layer type)."""
        key = (id(original), id(kept))
        if key not in state._memo or state._memo[key][0] is not original:
            state._memo[key] = (original, compute())
        return state._memo[key][1]


# ------------------------------------------------------------------ DyVTE's routers (the automatic exit)
ROUTER_PREFIX = "exit_router."


class ExitRouters(nn.Module):
    """DyVTE's per-layer routers: Linear(2d -> h) -> GELU -> Linear(h -> 2) on [mean of the text tokens' hidden
    states; the last token's] entering a layer; logit 1 above logit 0 means "the image tokens may exit here".
    Each row of a batch exits at the first layer where its router says so, as DyVTE decides per sample."""

    def __init__(self, hidden_size: int, num_layers: int, width: int | None = None):
        super().__init__()
        width = width or min(2048, 4 * hidden_size)
        self.first_layer = 1
        # the features' mean and spread per layer, measured on the training prompts (hidden states grow with depth)
        self.register_buffer("feature_mean", torch.zeros(num_layers, 2 * hidden_size))
        self.register_buffer("feature_std", torch.ones(num_layers, 2 * hidden_size))
        self.routers = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden_size, width), nn.GELU(), nn.Linear(width, 2))
            for _ in range(num_layers))

    @staticmethod
    def features(hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, L, d) hidden states and (B, L) text-token mask -> (B, 2d)."""
        weights = text.to(hidden.dtype)[..., None]
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return torch.cat([mean, hidden[:, -1]], dim=-1).float()

    def logits(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        return self.routers[layer]((features - self.feature_mean[layer]) / self.feature_std[layer])

    def exits(self, layer: int, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows whose image tokens may leave at `layer`."""
        logits = self.logits(layer, self.features(hidden, text))
        return logits[:, 1] > logits[:, 0]

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors saved with the model's mitigation statistics."""
        return {ROUTER_PREFIX + name: value.detach().contiguous() for name, value in self.state_dict().items()}

    @classmethod
    def from_stats(cls, stats: dict, hidden_size: int, num_layers: int) -> "ExitRouters | None":
        """The routers saved in a model's mitigation statistics, or None when they hold none."""
        weights = {k[len(ROUTER_PREFIX):]: v for k, v in stats.items() if k.startswith(ROUTER_PREFIX)}
        if not weights:
            return None
        routers = cls(hidden_size, num_layers, width=weights["routers.0.0.weight"].shape[0])
        routers.load_state_dict(weights)
        return routers.eval()

    @classmethod
    def of_model(cls, model, stats: dict) -> "ExitRouters | None":
        """`from_stats` for `model`, built once per loaded statistics (every generate call asks, and building them
        took a few milliseconds: a quarter of a tiny model's prefill)."""
        key = stats.get(ROUTER_PREFIX + "feature_mean")
        built = getattr(model, "_exit_routers", None)
        if built is None or built[0] is not key:
            routers = cls.from_stats(stats, model.config.get_text_config().hidden_size, len(decoder_layers(model)))
            built = (key, routers)
            model._exit_routers = built  # a plain attribute: not a submodule, never saved
        return built[1]


@torch.no_grad()
def exit_labels(model, inputs: dict, continuation: torch.Tensor, agreement: float = 0.99,
                loss_ratio: float = 1.03) -> torch.Tensor:
    """(B, L) bool: DyVTE's label per row and layer, True when exiting there keeps at least `agreement` of the
    full model's next-token argmaxes over `continuation` (its own greedy answer, teacher-forced) and the loss on
    it below `loss_ratio` times the full model's. Layer 0 never exits."""
    ids = torch.cat([inputs["input_ids"], continuation], dim=1)
    extended = {**inputs, "input_ids": ids}
    if inputs.get("attention_mask") is not None:
        extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(continuation)], dim=1)
    if inputs.get("mm_token_type_ids") is not None:  # our roles, or Qwen2-VL's token types (0: text)
        answer = torch.full_like(continuation, int(TokenRole.ANSWER) if is_suite_model(model) else 0)
        extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], answer], dim=1)
    steps = continuation.shape[1]

    def scores(layer):  # layer = num_layers: the full model
        with VisualTokenExit(model, layer):
            logits = model(**extended, use_cache=False).logits[:, -steps - 1:-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), continuation, reduction="none").mean(1)
        return logits.argmax(-1), loss

    num_layers = len(decoder_layers(model))
    full_argmax, full_loss = scores(num_layers)
    labels = torch.zeros(ids.shape[0], num_layers, dtype=torch.bool)
    for layer in range(1, num_layers):
        argmax, loss = scores(layer)
        labels[:, layer] = ((argmax == full_argmax).float().mean(1) >= agreement) & (loss < loss_ratio * full_loss)
    return labels


def train_exit_routers(model, batches, new_tokens: int = 16, steps: int = 300, seed: int = 0) -> ExitRouters:
    """Train the routers on `batches` of model inputs (each a prompt batch with images): labels from
    `exit_labels` on the model's own greedy answers, features from the full model's prefill (of that answer)."""
    num_layers = len(decoder_layers(model))
    features, labels = [], []
    for inputs in batches:
        with torch.no_grad():
            answer = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    output_hidden_states=True, return_dict_in_generate=True)
        continuation = answer.sequences[:, inputs["input_ids"].shape[1]:]
        hidden = answer.hidden_states[0]  # the prefill's: what enters each layer, then the final norm's input
        image = image_positions(model, inputs["input_ids"], inputs.get("mm_token_type_ids"))
        text = text_tokens(image, inputs.get("attention_mask"))
        features.append(torch.stack([ExitRouters.features(hidden[layer], text) for layer in range(num_layers)], 1))
        labels.append(exit_labels(model, inputs, continuation))
    features, labels = torch.cat(features), torch.cat(labels).long()
    with torch.random.fork_rng():  # seeded, leaving the caller's random state alone
        torch.manual_seed(seed)
        routers = ExitRouters(features.shape[-1] // 2, num_layers)
    routers.feature_mean.copy_(features.mean(0))
    routers.feature_std.copy_(features.std(0, correction=0).clamp(min=1e-6))
    optimizer = torch.optim.Adam(routers.parameters(), lr=1e-3)
    layers = range(routers.first_layer, num_layers)
    with torch.enable_grad():  # calibration runs under no_grad
        for _ in range(steps):
            loss = sum(torch.nn.functional.cross_entropy(routers.logits(layer, features[:, layer]), labels[:, layer])
                       for layer in layers)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return routers.eval()


def install(plan: Plan, options: dict):
    plan.exit_layer = options["layer"]
    if options["layer"] == "auto":
        plan.exit_routers = ExitRouters.of_model(plan.model, plan.stats)


register(Method(
    name="exit", description="visual-token exit: image tokens leave the decoder at a layer (faster, DyVTE)",
    # layer: the first decoder layer without image tokens; None: half the depth; "auto": DyVTE's trained routers
    defaults={"layer": None},
    install=install,
))
